//! Maps the core's typed errors to the Python exception hierarchy of `foresightkv.errors`.

use foresightkv::block::BlockError;
use foresightkv::cuda::CudaError;
use foresightkv::evict::EvictError;
use foresightkv::kernels::KernelError;
use foresightkv::ops::OpError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

/// The exception classes of `foresightkv.errors`, by meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ConfigError`: a configuration breaks a rule.
    Config,
    /// `InvalidArgumentError`: a refused value.
    InvalidArgument,
    /// `ShapeError`: shape, stride, contiguity or size mismatch.
    Shape,
    /// `ArgumentTypeError`: wrong Python type.
    ArgumentType,
    /// `DTypeError`: wrong element type.
    DType,
    /// `DeviceError`: wrong or mixed devices, CUDA unavailable.
    Device,
    /// `SequenceError`: unknown or duplicate sequence id.
    Sequence,
    /// `EvictionStateError`: the eviction schedule forbids the call.
    EvictionState,
    /// `FormatError`: a malformed checkpoint or trace.
    Format,
    /// `FileError`: reading or writing a file failed.
    File,
    /// `CudaError`: a driver call failed.
    Cuda,
    /// `CapacityError`: more than what was reserved at start-up.
    Capacity,
}

impl Kind {
    fn class_name(self) -> &'static str {
        match self {
            Kind::Config => "ConfigError",
            Kind::InvalidArgument => "InvalidArgumentError",
            Kind::Shape => "ShapeError",
            Kind::ArgumentType => "ArgumentTypeError",
            Kind::DType => "DTypeError",
            Kind::Device => "DeviceError",
            Kind::Sequence => "SequenceError",
            Kind::EvictionState => "EvictionStateError",
            Kind::Format => "FormatError",
            Kind::File => "FileError",
            Kind::Cuda => "CudaError",
            Kind::Capacity => "CapacityError",
        }
    }
}

fn errors_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    MODULE
        .get_or_try_init(py, || Ok(py.import("foresightkv.errors")?.unbind()))
        .map(|m| m.bind(py))
}

/// Builds the exception of class `name` of `foresightkv.errors` with constructor `args`.
fn build<'py, A>(py: Python<'py>, name: &str, args: A, message: &str) -> PyErr
where
    A: pyo3::call::PyCallArgs<'py>,
{
    let made = errors_module(py)
        .and_then(|m| m.getattr(name))
        .and_then(|cls| cls.call1(args));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => PyRuntimeError::new_err(format!(
            "{message} (and foresightkv.errors.{name} could not be raised: {e})"
        )),
    }
}

/// Runs `f` with the GIL released; its error becomes the Python exception that `to_py` (e.g.
/// [`op_error`], [`evict_error`]) makes of it for the function `func`.
pub fn detached<T: Send, E: Send>(
    py: Python<'_>,
    func: &str,
    to_py: fn(&str, E) -> PyErr,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> PyResult<T> {
    py.detach(f).map_err(|e| to_py(func, e))
}

/// A Python exception of `kind` carrying `message`.
pub fn error(kind: Kind, message: impl Into<String>) -> PyErr {
    let message = message.into();
    Python::attach(|py| build(py, kind.class_name(), (message.clone(),), &message))
}

/// The Python exception of a block-manager error.
pub fn block_error(e: BlockError) -> PyErr {
    let message = e.to_string();
    match e {
        BlockError::OutOfBlocks { needed, free } => Python::attach(|py| {
            build(
                py,
                "OutOfBlocksError",
                (message.clone(), needed, free),
                &message,
            )
        }),
        BlockError::UnknownSequence(_) | BlockError::DuplicateSequence(_) => {
            error(Kind::Sequence, message)
        }
        BlockError::InvalidConfig(_) => error(Kind::Config, message),
        BlockError::OutOfHostMemory { .. } => error(Kind::Config, message),
        BlockError::EvictionDue(_) | BlockError::NoEvictionDue(_) => {
            error(Kind::EvictionState, message)
        }
        BlockError::EmptyPrompt(_) | BlockError::SequenceTooLong { .. } => {
            error(Kind::InvalidArgument, message)
        }
    }
}

/// The Python exception of a kernel argument error, prefixed with the function name.
pub fn kernel_error(func: &str, e: KernelError) -> PyErr {
    let kind = match e {
        KernelError::InvalidSize { .. }
        | KernelError::InvalidStride { .. }
        | KernelError::BufferTooSmall { .. }
        | KernelError::ShapeMismatch(_)
        | KernelError::LengthBeyondBlockTable { .. } => Kind::Shape,
        KernelError::SlotOutOfRange { .. }
        | KernelError::BadWindow { .. }
        | KernelError::BlockOutOfRange { .. }
        | KernelError::NullPointer(_)
        | KernelError::InvalidArgument { .. } => Kind::InvalidArgument,
    };
    error(kind, format!("{func}: {e}"))
}

/// The Python exception of a CUDA error, prefixed with the function name.
pub fn cuda_error(func: &str, e: CudaError) -> PyErr {
    match e {
        CudaError::Kernel(k) => kernel_error(func, k),
        CudaError::KernelsNotCompiled
        | CudaError::FeatureDisabled
        | CudaError::NoDriver
        | CudaError::NoSuchDevice { .. } => error(Kind::Device, format!("{func}: {e}")),
        CudaError::Driver { .. } | CudaError::Fatbin(_) => {
            error(Kind::Cuda, format!("{func}: {e}"))
        }
    }
}

/// The Python exception of a kernel op's error, prefixed with the function name.
pub fn op_error(func: &str, e: OpError) -> PyErr {
    match e {
        OpError::Kernel(k) => kernel_error(func, k),
        OpError::Cuda(c) => cuda_error(func, c),
    }
}

/// The Python exception of an eviction-layer error, prefixed with the function name.
pub fn evict_error(func: &str, e: EvictError) -> PyErr {
    let kind = match e {
        EvictError::Kernel(k) => return kernel_error(func, k),
        EvictError::Shape(_) => Kind::Shape,
        EvictError::InvalidArgument { .. } => Kind::InvalidArgument,
        EvictError::CheckpointMismatch(_) | EvictError::StatsModeMismatch { .. } => Kind::Config,
        EvictError::BadCheckpoint { .. }
        | EvictError::BadTrace { .. }
        | EvictError::SafeTensors { .. }
        | EvictError::Json { .. } => Kind::Format,
        EvictError::Io { .. } => Kind::File,
    };
    error(kind, format!("{func}: {e}"))
}
