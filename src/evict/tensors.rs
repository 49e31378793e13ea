//! safetensors helpers shared by checkpoints, the converter and traces: reading f32/f16/bf16 tensors
//! as f32 with shape checks, and writing f32 tensors.

use super::EvictError;
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Reads a whole file (typed error on failure).
pub fn read_file(path: &Path) -> Result<Vec<u8>, EvictError> {
    // A file larger than this machine's memory is refused before it is read.
    let len = std::fs::metadata(path)
        .map_err(|e| EvictError::io(path, e))?
        .len();
    crate::limits::check_bytes(&format!("reading {}", path.display()), len as u128, 1)
        .map_err(|e| EvictError::bad_checkpoint(path.display().to_string(), e.to_string()))?;
    std::fs::read(path).map_err(|e| EvictError::io(path, e))
}

/// Whether [`to_f32`] reads this dtype (F32, F16, BF16).
pub fn supported(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Converts a tensor's little-endian f32/f16/bf16 data to f32; `None` for any other dtype.
pub fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Some(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            data.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            data.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// An owned f32 tensor to serialize.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian f32 bytes.
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    /// Packs f32 values with a shape (the caller guarantees `values.len()` = product of `shape`).
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            shape,
            bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Serializes named f32 tensors to safetensors bytes.
pub fn serialize(tensors: &[(String, OwnedTensor)], label: &str) -> Result<Vec<u8>, EvictError> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            TensorView::new(Dtype::F32, t.shape.clone(), &t.bytes).map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|source| EvictError::SafeTensors {
            path: label.to_string(),
            source,
        })?;
    safetensors::tensor::serialize(views, None::<HashMap<String, String>>).map_err(|source| {
        EvictError::SafeTensors {
            path: label.to_string(),
            source,
        }
    })
}

/// Writes bytes to a file (typed error on failure).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), EvictError> {
    std::fs::write(path, bytes).map_err(|e| EvictError::io(path, e))
}
