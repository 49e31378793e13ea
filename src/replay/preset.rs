//! Model presets by shape and GPU presets by memory, bandwidth and bf16 FLOP/s, and the KV memory
//! a GPU has left for the cache after the weights at a memory fraction.

use super::error::ReplayError;
use crate::DType;
use serde::Serialize;

/// The shape of a decoder-only model: what the KV cache and the roofline need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelPreset {
    /// Preset name as given on the command line.
    pub name: &'static str,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// KV heads per layer (grouped-query attention).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Parameters, embeddings included (weights read once per step).
    pub params: f64,
    /// Element type of the weights and the KV cache.
    pub dtype: DType,
}

impl ModelPreset {
    /// Bytes of K and V for one token over all layers and KV heads.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * self.dtype.size()
    }

    /// Bytes of the weights.
    pub fn weight_bytes(&self) -> f64 {
        self.params * self.dtype.size() as f64
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// The models the replay knows, from their published configs.
pub const MODELS: &[ModelPreset] = &[
    ModelPreset {
        name: "qwen3-1.7b",
        layers: 28,
        q_heads: 16,
        kv_heads: 8,
        head_dim: 128,
        params: 1.72e9,
        dtype: DType::Bf16,
    },
    ModelPreset {
        name: "qwen3-4b",
        layers: 36,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        params: 4.02e9,
        dtype: DType::Bf16,
    },
    ModelPreset {
        name: "qwen3-8b",
        layers: 36,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        params: 8.19e9,
        dtype: DType::Bf16,
    },
    ModelPreset {
        name: "deepseek-r1-distill-qwen-7b",
        layers: 28,
        q_heads: 28,
        kv_heads: 4,
        head_dim: 128,
        params: 7.62e9,
        dtype: DType::Bf16,
    },
    ModelPreset {
        name: "llama-3.1-8b",
        layers: 32,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        params: 8.03e9,
        dtype: DType::Bf16,
    },
];

/// A GPU as the roofline sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuPreset {
    /// Preset name as given on the command line.
    pub name: &'static str,
    /// Device memory in bytes (as the driver reports it).
    pub memory_bytes: f64,
    /// Peak memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Peak dense bf16 tensor FLOP/s.
    pub bf16_flops: f64,
}

const MIB: f64 = 1024.0 * 1024.0;
/// Bytes in a GiB, for reports.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The GPUs the replay knows, from their data sheets (memory as the driver reports it).
pub const GPUS: &[GpuPreset] = &[
    GpuPreset {
        name: "h200",
        memory_bytes: 143_771.0 * MIB,
        bandwidth: 4.8e12,
        bf16_flops: 989e12,
    },
    GpuPreset {
        name: "h100",
        memory_bytes: 81_559.0 * MIB,
        bandwidth: 3.35e12,
        bf16_flops: 989e12,
    },
    GpuPreset {
        name: "a100-80g",
        memory_bytes: 81_920.0 * MIB,
        bandwidth: 2.039e12,
        bf16_flops: 312e12,
    },
    GpuPreset {
        name: "l4",
        memory_bytes: 23_034.0 * MIB,
        bandwidth: 300e9,
        bf16_flops: 121e12,
    },
];

/// Looks up a model preset by name (case-insensitive).
pub fn model(name: &str) -> Result<&'static ModelPreset, ReplayError> {
    MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| ReplayError::UnknownPreset {
            kind: "model",
            name: name.into(),
            known: MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
        })
}

/// Looks up a GPU preset by name (case-insensitive; "a800" is the A100-80G's export twin).
pub fn gpu(name: &str) -> Result<&'static GpuPreset, ReplayError> {
    let key = if name.eq_ignore_ascii_case("a800") {
        "a100-80g"
    } else {
        name
    };
    GPUS.iter()
        .find(|g| g.name.eq_ignore_ascii_case(key))
        .ok_or_else(|| ReplayError::UnknownPreset {
            kind: "gpu",
            name: name.into(),
            known: GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", "),
        })
}

/// Bytes left for the KV cache: GPU memory times `fraction`, less the weights.
pub fn kv_memory_bytes(
    model: &ModelPreset,
    gpu: &GpuPreset,
    fraction: f64,
) -> Result<f64, ReplayError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(ReplayError::Config(format!(
            "memory fraction {fraction} is not in (0, 1]"
        )));
    }
    let usable = gpu.memory_bytes * fraction;
    let left = usable - model.weight_bytes();
    if left <= 0.0 {
        return Err(ReplayError::NoKvMemory {
            usable_gib: usable / GIB,
            weights_gib: model.weight_bytes() / GIB,
        });
    }
    Ok(left)
}

/// Number of KV blocks of `block_size` tokens that fit in `kv_bytes`.
pub fn num_blocks(model: &ModelPreset, kv_bytes: f64, block_size: usize) -> usize {
    (kv_bytes / (block_size * model.kv_bytes_per_token()) as f64).floor() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_4b_kv_bytes_per_token_is_144_kib() {
        let m = model("Qwen3-4B").unwrap();
        assert_eq!(m.kv_bytes_per_token(), 2 * 36 * 8 * 128 * 2);
        assert_eq!(m.kv_bytes_per_token(), 144 * 1024);
        assert_eq!(m.group_size(), 4);
    }

    #[test]
    fn every_preset_is_consistent() {
        for m in MODELS {
            assert_eq!(m.q_heads % m.kv_heads, 0, "{}", m.name);
            assert!(m.params > 1e9);
        }
        for g in GPUS {
            assert!(g.memory_bytes > 16.0 * GIB && g.bandwidth > 1e11 && g.bf16_flops > 1e13);
        }
        assert_eq!(gpu("A800").unwrap().name, "a100-80g");
    }

    #[test]
    fn kv_memory_is_what_weights_leave() {
        let (m, g) = (model("qwen3-4b").unwrap(), gpu("h200").unwrap());
        let kv = kv_memory_bytes(m, g, 0.9).unwrap();
        assert!((kv - (143_771.0 * MIB * 0.9 - 4.02e9 * 2.0)).abs() < 1.0);
        let blocks = num_blocks(m, kv, 16);
        assert_eq!(blocks, (kv / (16.0 * 147_456.0)).floor() as usize);
        let l4 = gpu("l4").unwrap();
        assert!(matches!(
            kv_memory_bytes(model("qwen3-8b").unwrap(), l4, 0.5),
            Err(ReplayError::NoKvMemory { .. })
        ));
        assert!(matches!(
            kv_memory_bytes(m, g, 1.5),
            Err(ReplayError::Config(_))
        ));
        assert!(matches!(
            model("gpt-5"),
            Err(ReplayError::UnknownPreset { kind: "model", .. })
        ));
    }
}
