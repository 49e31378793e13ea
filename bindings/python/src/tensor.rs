//! Zero-copy views of PyTorch tensors (CPU and CUDA) and numpy arrays, read from their data pointer,
//! shape, strides, dtype and device, and validated before any memory is touched.
//!
//! Only genuine `torch.Tensor` and `numpy.ndarray` objects are accepted (checked with `isinstance`),
//! so a duck-typed object cannot hand a forged pointer to the kernels. A view keeps its Python object
//! alive; callers must not resize or free a tensor from another thread while a call runs.

use crate::args::type_name;
use crate::errors::{error, Kind};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyModule, PyTuple};
use std::fmt;

/// Where a tensor's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// Memory of CUDA device `n`.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Element types the kernels understand (anything else is `Other`, refused with its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
    /// int32.
    I32,
    /// int64.
    I64,
    /// Any other dtype.
    Other,
}

impl ElemType {
    /// Bytes per element (1 for `Other`, only used for range checks).
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 => 4,
            ElemType::F16 | ElemType::Bf16 => 2,
            ElemType::I64 => 8,
            ElemType::Other => 1,
        }
    }

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float32",
            ElemType::F16 => "float16",
            ElemType::Bf16 => "bfloat16",
            ElemType::I32 => "int32",
            ElemType::I64 => "int64",
            ElemType::Other => "other",
        }
    }

    /// The core's cache element type, for float dtypes.
    pub fn cache_dtype(self) -> Option<foresightkv::DType> {
        match self {
            ElemType::F32 => Some(foresightkv::DType::F32),
            ElemType::F16 => Some(foresightkv::DType::F16),
            ElemType::Bf16 => Some(foresightkv::DType::Bf16),
            _ => None,
        }
    }
}

/// The float dtypes a KV cache may have.
pub const FLOATS: &[ElemType] = &[ElemType::F32, ElemType::F16, ElemType::Bf16];

/// A validated, borrowed view of a tensor's memory.
pub struct Tensor<'py> {
    /// Argument name, for messages.
    pub name: String,
    /// The Python object, kept alive while the view is used.
    pub obj: Bound<'py, PyAny>,
    /// Address of element 0.
    pub ptr: usize,
    /// Sizes.
    pub shape: Vec<i64>,
    /// Strides in elements (all non-negative).
    pub strides: Vec<i64>,
    /// Element type.
    pub dtype: ElemType,
    /// The dtype as the library spells it (for messages).
    pub dtype_name: String,
    /// Where the memory lives.
    pub device: Device,
    /// Whether writes are forbidden (read-only numpy arrays).
    pub readonly: bool,
    /// Elements from element 0 to one past the last addressed element.
    pub extent: usize,
}

/// A tensor's memory as plain numbers, to carry into code that runs without the GIL.
#[derive(Debug, Clone, Copy)]
pub struct Raw {
    /// Address of element 0.
    pub ptr: usize,
    /// Elements addressed.
    pub len: usize,
}

impl Raw {
    /// The memory as a slice.
    ///
    /// # Safety
    /// The tensor must be alive, on the host, of element type `T`, and not written concurrently.
    pub unsafe fn slice<'a, T>(self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr as *const T, self.len)
    }

    /// The memory as a mutable slice.
    ///
    /// # Safety
    /// As [`Raw::slice`], and no other live slice may overlap it.
    pub unsafe fn slice_mut<'a, T>(self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len)
    }
}

/// The class `module.name` if `module` has been imported (a tensor of a library nobody imported
/// cannot exist), cached once found.
fn loaded_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    module: &str,
    name: &str,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if let Some(cls) = cell.get(py) {
        return Ok(Some(cls.bind(py).clone()));
    }
    // `sys.modules` is one dict for the interpreter's life: looked up once, not imported per call.
    static MODULES: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
    let modules = MODULES.get_or_try_init(py, || {
        PyModule::import(py, "sys")?
            .getattr("modules")?
            .cast_into::<PyDict>()
            .map(Bound::unbind)
            .map_err(PyErr::from)
    })?;
    let modules = modules.bind(py);
    match modules.get_item(module)? {
        None => Ok(None),
        Some(m) => {
            let cls = m.getattr(name)?;
            Ok(Some(cell.get_or_init(py, || cls.unbind()).bind(py).clone()))
        }
    }
}

/// The torch objects a tensor's layout and dtype are compared with (by identity: no strings per
/// call), looked up once torch is loaded.
struct TorchObjects {
    strided: Py<PyAny>,
    dtypes: Vec<(Py<PyAny>, ElemType)>,
}

impl TorchObjects {
    fn get(py: Python<'_>) -> PyResult<&'static TorchObjects> {
        static CELL: PyOnceLock<TorchObjects> = PyOnceLock::new();
        CELL.get_or_try_init(py, || {
            let torch = py.import("torch")?;
            let dtypes = [
                ("float32", ElemType::F32),
                ("float16", ElemType::F16),
                ("bfloat16", ElemType::Bf16),
                ("int32", ElemType::I32),
                ("int64", ElemType::I64),
            ]
            .into_iter()
            .map(|(n, e)| Ok((torch.getattr(n)?.unbind(), e)))
            .collect::<PyResult<_>>()?;
            Ok(TorchObjects {
                strided: torch.getattr("strided")?.unbind(),
                dtypes,
            })
        })
    }
}

fn shape_err(name: &str, what: String) -> PyErr {
    error(Kind::Shape, format!("{name} {what}"))
}

impl<'py> Tensor<'py> {
    /// The view of `obj` if it is a `torch.Tensor` or `numpy.ndarray`, `None` if it is neither.
    pub fn try_extract(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Option<Self>> {
        static TORCH_TENSOR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        static NUMPY_NDARRAY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let py = obj.py();
        if let Some(cls) = loaded_class(py, &TORCH_TENSOR, "torch", "Tensor")? {
            if obj.is_instance(&cls)? {
                return Self::from_torch(name, obj).map(Some);
            }
        }
        if let Some(cls) = loaded_class(py, &NUMPY_NDARRAY, "numpy", "ndarray")? {
            if obj.is_instance(&cls)? {
                return Self::from_numpy(name, obj).map(Some);
            }
        }
        Ok(None)
    }

    /// The view of `obj`, which must be a `torch.Tensor` or `numpy.ndarray`.
    pub fn extract(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Some(t) = Self::try_extract(name, obj)? {
            return Ok(t);
        }
        if let Some(view) = Self::from_dlpack(obj)? {
            if let Some(t) = Self::try_extract(name, &view)? {
                return Ok(t);
            }
        }
        Err(error(
            Kind::ArgumentType,
            format!(
                "{name} must be a torch.Tensor, a numpy.ndarray or a DLPack tensor, got {}",
                type_name(obj)
            ),
        ))
    }

    /// A zero-copy torch (any device) or numpy (CPU) view of an object exporting `__dlpack__`
    /// (CuPy, JAX, ...), made by the library that is loaded; the view keeps the producer alive.
    fn from_dlpack(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        static TORCH_TENSOR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let py = obj.py();
        if !obj.hasattr(intern!(py, "__dlpack__"))? {
            return Ok(None);
        }
        let converted = if loaded_class(py, &TORCH_TENSOR, "torch", "Tensor")?.is_some() {
            py.import("torch")?.getattr("from_dlpack")?.call1((obj,))
        } else {
            py.import("numpy")?.getattr("from_dlpack")?.call1((obj,))
        };
        converted.map(Some).map_err(|e| {
            error(
                Kind::ArgumentType,
                format!(
                    "{} exports __dlpack__ but could not be imported: {e}",
                    type_name(obj)
                ),
            )
        })
    }

    fn from_torch(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let py = obj.py();
        let torch = TorchObjects::get(py)?;
        let layout = obj.getattr(intern!(py, "layout"))?;
        if !layout.is(&torch.strided) || obj.getattr(intern!(py, "is_nested"))?.is_truthy()? {
            return Err(shape_err(
                name,
                format!(
                    "has layout {}: a dense strided tensor is needed",
                    layout.str()?
                ),
            ));
        }
        // Booleans first (the common case, no strings); the device's type only for a message.
        let device = if obj.getattr(intern!(py, "is_cpu"))?.is_truthy()? {
            Device::Cpu
        } else if obj.getattr(intern!(py, "is_cuda"))?.is_truthy()? {
            let index: i64 = obj.call_method0(intern!(py, "get_device"))?.extract()?;
            Device::Cuda(usize::try_from(index).unwrap_or(0))
        } else {
            let dev = obj.getattr(intern!(py, "device"))?;
            let other: String = dev.getattr(intern!(py, "type"))?.extract()?;
            return Err(error(
                Kind::Device,
                format!("{name} is on device '{other}': only CPU and CUDA tensors hold data foresightkv can use"),
            ));
        };
        let dt = obj.getattr(intern!(py, "dtype"))?;
        let (dtype, dtype_name) = match torch.dtypes.iter().find(|(d, _)| dt.is(d)) {
            Some((_, e)) => (*e, format!("torch.{}", e.name())),
            None => (ElemType::Other, dt.str()?.to_string()),
        };
        let shape: Vec<i64> = obj.getattr(intern!(obj.py(), "shape"))?.extract()?;
        let strides: Vec<i64> = obj.call_method0(intern!(obj.py(), "stride"))?.extract()?;
        let ptr: usize = obj.call_method0(intern!(obj.py(), "data_ptr"))?.extract()?;
        let t = Self::finish(
            name, obj, ptr, shape, strides, dtype, dtype_name, device, false,
        )?;
        if t.extent > 0 {
            let storage = obj.call_method0(intern!(obj.py(), "untyped_storage"))?;
            let base: usize = storage
                .call_method0(intern!(obj.py(), "data_ptr"))?
                .extract()?;
            let len: usize = storage
                .call_method0(intern!(obj.py(), "nbytes"))?
                .extract()?;
            t.check_within(base, len, "its storage")?;
        }
        Ok(t)
    }

    fn from_numpy(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let ai = obj.getattr(intern!(obj.py(), "__array_interface__"))?;
        let data = ai.get_item("data")?;
        let data = data.cast::<PyTuple>().map_err(PyErr::from)?;
        let ptr: usize = data.get_item(0)?.extract()?;
        let readonly: bool = data.get_item(1)?.extract()?;
        let shape: Vec<i64> = ai.get_item("shape")?.extract()?;
        let typestr: String = ai.get_item("typestr")?.extract()?;
        let dtype = match typestr.as_str() {
            "<f4" => ElemType::F32,
            "<f2" => ElemType::F16,
            "<i4" => ElemType::I32,
            "<i8" => ElemType::I64,
            _ => ElemType::Other,
        };
        let item = obj
            .getattr(intern!(obj.py(), "itemsize"))?
            .extract::<i64>()?
            .max(1);
        let byte_strides: Option<Vec<i64>> = ai.get_item("strides")?.extract()?;
        let strides = match byte_strides {
            None => contiguous_strides(&shape),
            Some(bs) => {
                if let Some(s) = bs.iter().find(|s| *s % item != 0) {
                    return Err(shape_err(
                        name,
                        format!(
                            "has a byte stride {s} that is not a multiple of its item size {item}"
                        ),
                    ));
                }
                bs.iter().map(|s| s / item).collect()
            }
        };
        let dtype_name = format!("numpy {}", obj.getattr(intern!(obj.py(), "dtype"))?.str()?);
        let t = Self::finish(
            name,
            obj,
            ptr,
            shape,
            strides,
            dtype,
            dtype_name,
            Device::Cpu,
            readonly,
        )?;
        if t.extent > 0 {
            let (base, len, what) = numpy_memory(obj)?;
            t.check_within(base, len, what)?;
        }
        Ok(t)
    }

    /// Requires the addressed bytes to lie inside `[base, base + len)`.
    fn check_within(&self, base: usize, len: usize, what: &str) -> PyResult<()> {
        let (a, b) = self.byte_range();
        if a >= base && b <= base.saturating_add(len) {
            return Ok(());
        }
        Err(shape_err(
            &self.name,
            format!(
                "with shape {:?} and strides {:?} addresses bytes [{a:#x}, {b:#x}) outside {what} [{base:#x}, {:#x})",
                self.shape,
                self.strides,
                base.saturating_add(len)
            ),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        name: &str,
        obj: &Bound<'py, PyAny>,
        ptr: usize,
        shape: Vec<i64>,
        strides: Vec<i64>,
        dtype: ElemType,
        dtype_name: String,
        device: Device,
        readonly: bool,
    ) -> PyResult<Self> {
        if shape.len() != strides.len() {
            return Err(shape_err(
                name,
                format!("reports shape {shape:?} but strides {strides:?}"),
            ));
        }
        if strides.iter().any(|&s| s < 0) {
            return Err(shape_err(
                name,
                format!("has negative strides {strides:?}: flip it into a new tensor first"),
            ));
        }
        let empty = shape.contains(&0);
        let mut last: i128 = 0;
        for (&d, &s) in shape.iter().zip(&strides) {
            if d < 0 {
                return Err(shape_err(
                    name,
                    format!("has a negative size in shape {shape:?}"),
                ));
            }
            if d > 0 {
                last += (d as i128 - 1) * s as i128;
            }
        }
        let extent = if empty { 0 } else { last + 1 };
        let bytes = extent * dtype.size() as i128;
        if bytes > isize::MAX as i128 || ptr as i128 + bytes > usize::MAX as i128 {
            return Err(shape_err(name, format!("with shape {shape:?} and strides {strides:?} addresses more memory than exists")));
        }
        if extent > 0 && ptr == 0 {
            return Err(error(
                Kind::InvalidArgument,
                format!("{name} has a null data pointer"),
            ));
        }
        if !ptr.is_multiple_of(dtype.size()) {
            return Err(error(
                Kind::InvalidArgument,
                format!(
                    "{name} data at {ptr:#x} is not aligned to its {}-byte elements",
                    dtype.size()
                ),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            obj: obj.clone(),
            ptr,
            shape,
            strides,
            dtype,
            dtype_name,
            device,
            readonly,
            extent: extent as usize,
        })
    }

    /// The memory as plain numbers.
    pub fn raw(&self) -> Raw {
        Raw {
            ptr: self.ptr,
            len: self.extent,
        }
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Requires one of `allowed` dtypes.
    pub fn expect_dtype(&self, allowed: &[ElemType]) -> PyResult<()> {
        if allowed.contains(&self.dtype) {
            return Ok(());
        }
        let names: Vec<_> = allowed.iter().map(|d| d.name()).collect();
        Err(error(
            Kind::DType,
            format!(
                "{} has dtype {}, expected {}",
                self.name,
                self.dtype_name,
                names.join(" or ")
            ),
        ))
    }

    /// Requires the same dtype as `other`.
    pub fn expect_same_dtype(&self, other: &Tensor<'_>) -> PyResult<()> {
        if self.dtype == other.dtype {
            return Ok(());
        }
        Err(error(
            Kind::DType,
            format!(
                "{} has dtype {} but {} has {}: they must match",
                self.name, self.dtype_name, other.name, other.dtype_name
            ),
        ))
    }

    /// Requires `n` dimensions.
    pub fn expect_ndim(&self, n: usize) -> PyResult<()> {
        if self.ndim() == n {
            return Ok(());
        }
        Err(shape_err(
            &self.name,
            format!("has shape {:?}, expected {n} dimensions", self.shape),
        ))
    }

    /// Requires `shape[axis] == want` (`what` says what the size stands for).
    pub fn expect_dim(&self, axis: usize, want: i64, what: &str) -> PyResult<()> {
        if self.shape[axis] == want {
            return Ok(());
        }
        Err(shape_err(
            &self.name,
            format!(
                "has shape {:?}: dimension {axis} must be {want} ({what})",
                self.shape
            ),
        ))
    }

    /// Requires exactly the shape `want` (`what` describes it).
    pub fn expect_shape(&self, want: &[i64], what: &str) -> PyResult<()> {
        if self.shape == want {
            return Ok(());
        }
        Err(shape_err(
            &self.name,
            format!("has shape {:?}, expected {want:?} ({what})", self.shape),
        ))
    }

    /// Requires host memory.
    pub fn expect_cpu(&self) -> PyResult<()> {
        if self.device == Device::Cpu {
            return Ok(());
        }
        Err(error(
            Kind::Device,
            format!("{} is on {}, expected a CPU tensor", self.name, self.device),
        ))
    }

    /// Requires a writable tensor.
    pub fn expect_writable(&self) -> PyResult<()> {
        if !self.readonly {
            return Ok(());
        }
        Err(error(
            Kind::InvalidArgument,
            format!("{} is read-only but is written by this call", self.name),
        ))
    }

    /// Whether the axes from `k` on are row-major contiguous (size-1 axes may have any stride).
    fn contiguous_from(&self, k: usize) -> bool {
        let want = contiguous_strides(&self.shape[k..]);
        self.shape[k..]
            .iter()
            .zip(&self.strides[k..])
            .zip(&want)
            .all(|((&d, &s), &w)| d <= 1 || s == w)
    }

    /// Requires row-major contiguity (size-1 axes may have any stride).
    pub fn expect_contiguous(&self) -> PyResult<()> {
        if self.contiguous_from(0) {
            return Ok(());
        }
        Err(shape_err(
            &self.name,
            format!(
                "must be contiguous (shape {:?}, strides {:?}): call .contiguous() first",
                self.shape, self.strides
            ),
        ))
    }

    /// Requires the last `n` axes to be contiguous (the rest may have any stride).
    pub fn expect_inner_contiguous(&self, n: usize) -> PyResult<()> {
        if self.contiguous_from(self.ndim().saturating_sub(n)) {
            return Ok(());
        }
        Err(shape_err(
            &self.name,
            format!(
                "must be contiguous in its last {n} dimension(s) (shape {:?}, strides {:?})",
                self.shape, self.strides
            ),
        ))
    }

    /// The stride of `axis`, or the row-major stride when the axis has size <= 1 (its stride is
    /// never used to address memory then, and libraries report arbitrary values for it).
    pub fn stride(&self, axis: usize) -> i64 {
        if self.shape[axis] <= 1 {
            contiguous_strides(&self.shape)[axis]
        } else {
            self.strides[axis]
        }
    }

    /// Reads a 1-D tensor's elements in order (host memory, dtype `T` checked by the caller).
    ///
    /// # Safety
    /// The tensor must be on the host and of element type `T`.
    pub unsafe fn read_strided<T: Copy>(&self) -> Vec<T> {
        let n = self.shape[0].max(0) as usize;
        let s = self.strides[0] as usize;
        let base = self.ptr as *const T;
        (0..n).map(|i| *base.add(i * s)).collect()
    }

    fn byte_range(&self) -> (usize, usize) {
        (self.ptr, self.ptr + self.extent * self.dtype.size())
    }
}

/// The memory `arr` may address, `(address, bytes, what it is)`, found by following `.base` through
/// views and wrappers such as `as_strided`'s: the ndarray that owns its data; else the buffer the
/// chain ends in (bytes, bytearray, mmap, ...: read through the buffer protocol); else, for a
/// foreign owner that exports no contiguous buffer (DLPack capsules, C-API arrays), the range the
/// root-most ndarray of the chain was created with by its provider. Every numpy array is checked:
/// an `as_strided` view over a `bytearray` is bounded by the `bytearray`.
fn numpy_memory(arr: &Bound<'_, PyAny>) -> PyResult<(usize, usize, &'static str)> {
    let py = arr.py();
    let numpy = PyModule::import(py, "numpy")?;
    let ndarray = numpy.getattr(intern!(py, "ndarray"))?;
    let mut cur = arr.clone();
    let mut root = arr.clone();
    for _ in 0..256 {
        if cur.is_instance(&ndarray)? {
            if cur
                .getattr(intern!(py, "flags"))?
                .get_item("OWNDATA")?
                .is_truthy()?
            {
                let (base, len) = ndarray_range(&cur)?;
                return Ok((base, len, "the array that owns its memory"));
            }
            root = cur.clone();
        }
        match cur.getattr(intern!(py, "base")) {
            Ok(next) if !next.is_none() => cur = next,
            _ => break,
        }
    }
    if !cur.is_instance(&ndarray)? {
        // The buffer the chain ends in, viewed as bytes (contiguous buffers only).
        let u8 = numpy.getattr(intern!(py, "uint8"))?;
        if let Ok(bytes) = numpy.call_method1(intern!(py, "frombuffer"), (&cur, u8)) {
            let data = bytes
                .getattr(intern!(py, "__array_interface__"))?
                .get_item("data")?;
            let base: usize = data.get_item(0)?.extract()?;
            let len: usize = bytes.getattr(intern!(py, "nbytes"))?.extract()?;
            return Ok((base, len, "the buffer that owns its memory"));
        }
        if let Some(e) = PyErr::take(py) {
            drop(e);
        }
    }
    let (base, len) = ndarray_range(&root)?;
    Ok((
        base,
        len,
        "the memory its provider gave the root array of its .base chain",
    ))
}

/// The bytes an ndarray addresses by its own shape and strides, `(lowest address, length)`.
fn ndarray_range(a: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let py = a.py();
    let ai = a.getattr(intern!(py, "__array_interface__"))?;
    let ptr: usize = ai.get_item("data")?.get_item(0)?.extract()?;
    let shape: Vec<i64> = ai.get_item("shape")?.extract()?;
    let item: i128 = a.getattr(intern!(py, "itemsize"))?.extract::<i64>()?.max(1) as i128;
    let strides: Vec<i64> = match ai.get_item("strides")?.extract::<Option<Vec<i64>>>()? {
        Some(s) => s,
        None => contiguous_strides(&shape)
            .iter()
            .map(|s| s.saturating_mul(item as i64))
            .collect(),
    };
    if shape.contains(&0) {
        return Ok((ptr, 0));
    }
    let (mut lo, mut hi) = (0i128, 0i128);
    for (&d, &st) in shape.iter().zip(&strides) {
        let span = (d.max(1) as i128 - 1) * st as i128;
        if span < 0 {
            lo += span;
        } else {
            hi += span;
        }
    }
    let start = ptr as i128 + lo;
    let len = hi - lo + item;
    if start < 0 || len < 0 || start + len > usize::MAX as i128 {
        return Err(shape_err(
            "array",
            format!("with shape {shape:?} and byte strides {strides:?} addresses no valid memory"),
        ));
    }
    Ok((start as usize, len as usize))
}

/// Whether two different indices of a view (`shape`, `strides` in elements) may address the same
/// element: sorted by stride, each axis longer than 1 must step over everything the smaller axes
/// span (a stride 0 never does). Conservative: `false` proves the elements are distinct.
pub fn may_self_overlap(shape: &[i64], strides: &[i64]) -> bool {
    let mut dims: Vec<(i128, i128)> = shape
        .iter()
        .zip(strides)
        .filter(|(&d, _)| d > 1)
        .map(|(&d, &s)| ((s as i128).abs(), d as i128))
        .collect();
    dims.sort_unstable();
    let mut span: i128 = 1;
    for (s, d) in dims {
        if s < span {
            return true;
        }
        span += (d - 1) * s;
    }
    false
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    strides
}

/// Requires every tensor on the same device; returns it.
pub fn same_device(tensors: &[&Tensor<'_>]) -> PyResult<Device> {
    let first = tensors[0];
    for t in &tensors[1..] {
        if t.device != first.device {
            return Err(error(
                Kind::Device,
                format!(
                    "{} is on {} but {} is on {}: all tensors must be on one device",
                    t.name, t.device, first.name, first.device
                ),
            ));
        }
    }
    Ok(first.device)
}

/// Requires each written tensor to be writable, to address each of its elements once (no stride 0,
/// no self-overlapping strides: writing one element must not overwrite another), and to share no
/// memory with any other argument (views that only interleave with it, [`interleaved_disjoint`],
/// share none). `fused` names a K/V cache pair already checked to be the fused
/// K|V layout ([`kv_relation`]), whose two views interleave in one tensor without sharing elements.
/// The one check every writer uses.
pub fn check_outputs(
    outputs: &[&Tensor<'_>],
    all: &[&Tensor<'_>],
    fused: Option<(&Tensor<'_>, &Tensor<'_>)>,
) -> PyResult<()> {
    for out in outputs {
        out.expect_writable()?;
        if out.extent > 0 && may_self_overlap(&out.shape, &out.strides) {
            return Err(shape_err(
                &out.name,
                format!(
                    "with shape {:?} and strides {:?} addresses some elements more than once (a \
                     broadcast or stride-0 view): a tensor this call writes needs one element per index",
                    out.shape, out.strides
                ),
            ));
        }
        let (a0, a1) = out.byte_range();
        for other in all {
            if std::ptr::eq(*out, *other) {
                continue;
            }
            if let Some((k, v)) = fused {
                let pair = |x: &Tensor<'_>, y: &Tensor<'_>| {
                    std::ptr::eq(x, k) && std::ptr::eq(y, v)
                        || std::ptr::eq(x, v) && std::ptr::eq(y, k)
                };
                if pair(out, other) {
                    continue;
                }
            }
            let (b0, b1) = other.byte_range();
            if a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1 && !interleaved_disjoint(out, other) {
                return Err(error(
                    Kind::InvalidArgument,
                    format!("{} shares memory with {}: a tensor this call writes must not overlap another argument", out.name, other.name),
                ));
            }
        }
    }
    Ok(())
}

/// Bytes `[start, start + span)` within each period `p` that tensor `t`'s elements occupy, when
/// every dimension of size > 1 either steps by a multiple of `p` (an outer axis) or stays inside
/// one period (inner axes spanning at most `p` bytes): `(start mod p, span)`, else None.
fn residues(t: &Tensor<'_>, p: i128) -> Option<(i128, i128)> {
    let es = t.dtype.size() as i128;
    let mut span = es;
    for (&d, &s) in t.shape.iter().zip(&t.strides) {
        let sb = s as i128 * es;
        if d > 1 && sb % p != 0 {
            span += (d as i128 - 1) * sb;
        }
    }
    (span <= p).then_some(((t.ptr as i128).rem_euclid(p), span))
}

/// Whether `a` and `b`, whose byte ranges meet, still share no byte because they interleave: for
/// some period `p` (one of their strides) each lies in its own window of every period, e.g. K, V
/// and the statistics packed side by side in each (block, slot, head) cell of one KV page (vLLM's
/// `state_content_bytes`). Exact for such views; False (not shown disjoint) otherwise.
pub fn interleaved_disjoint(a: &Tensor<'_>, b: &Tensor<'_>) -> bool {
    let mut periods: Vec<i128> = [a, b]
        .iter()
        .flat_map(|t| {
            let es = t.dtype.size() as i128;
            t.shape
                .iter()
                .zip(&t.strides)
                .filter(|(&d, &s)| d > 1 && s > 0)
                .map(move |(_, &s)| s as i128 * es)
        })
        .collect();
    periods.sort_unstable();
    periods.dedup();
    periods
        .into_iter()
        .any(|p| match (residues(a, p), residues(b, p)) {
            (Some((ra, sa)), Some((rb, sb))) => {
                (rb - ra).rem_euclid(p) >= sa && (ra - rb).rem_euclid(p) >= sb
            }
            _ => false,
        })
}

/// How a key cache and a value cache share memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvRelation {
    /// Separate memory (their byte ranges do not meet).
    Split,
    /// One fused K|V tensor: the value view starts `head_dim` elements after the key view, with the
    /// same strides, and no element belongs to both (the kernels take it as one buffer).
    Fused,
}

/// The relation of `key` and `value` (same dtype and shape, last axis `head_dim` contiguous): split,
/// the fused K|V layout, or an error when they share memory any other way (overlapping views,
/// the same tensor twice, a value view shifted into the next head). One contract for every kernel
/// that takes a K/V cache pair.
pub fn kv_relation(key: &Tensor<'_>, value: &Tensor<'_>, head_dim: i64) -> PyResult<KvRelation> {
    let ((a0, a1), (b0, b1)) = (key.byte_range(), value.byte_range());
    if a0 >= a1 || b0 >= b1 || a1 <= b0 || b1 <= a0 {
        return Ok(KvRelation::Split);
    }
    let ndim = key.ndim();
    let strides = |t: &Tensor<'_>| (0..ndim).map(|i| t.stride(i)).collect::<Vec<_>>();
    let (ks, vs) = (strides(key), strides(value));
    let offset = head_dim as i128 * key.dtype.size() as i128;
    let fused_offset = value.ptr as i128 - key.ptr as i128 == offset;
    // Both views as one with a leading K/V axis of stride head_dim: no element may repeat.
    let mut shape = vec![2];
    shape.extend_from_slice(&key.shape);
    let mut both = vec![head_dim];
    both.extend_from_slice(&ks);
    if fused_offset && ks == vs && key.shape == value.shape && !may_self_overlap(&shape, &both) {
        return Ok(KvRelation::Fused);
    }
    Err(error(
        Kind::InvalidArgument,
        format!(
            "{} shares memory with {} but they are not the fused K|V layout (value view = key \
             view + head_dim {head_dim} elements, same strides, no element in both): key at {:#x} \
             strides {ks:?}, value at {:#x} strides {vs:?}",
            value.name, key.name, key.ptr, value.ptr
        ),
    ))
}

/// PyTorch's current CUDA stream of device `ordinal`, as a raw `CUstream`.
pub fn torch_stream(py: Python<'_>, ordinal: usize) -> PyResult<u64> {
    let torch = py.import("torch")?;
    let stream = torch
        .getattr(intern!(py, "cuda"))?
        .call_method1("current_stream", (ordinal,))?;
    stream.getattr(intern!(py, "cuda_stream"))?.extract()
}
