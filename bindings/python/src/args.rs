//! Conversion of plain Python arguments (integers, sequences of token ids) with errors that name the
//! argument and the offending value instead of Python's generic OverflowError / TypeError, and the
//! declaration of the functions that take their arguments that way ([`py_fn`]).

use crate::errors::{error, Kind};
use crate::tensor::{ElemType, Tensor};
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// Declares a Python function whose arguments arrive as Python objects, for the body to convert
/// with the helpers of this module (errors naming the argument and the offending value): in the
/// list after `py;`, `name` is a `&Bound<PyAny>`, `name?` an `Option<&Bound<PyAny>>` (a default in
/// the `#[pyo3(signature)]`), `name: T` a value PyO3 extracts itself. Attributes and docs (the
/// `#[pyfunction]`, its signature, the docstring) pass through in order; the body sees the
/// function's name as the `&str` `F`, for its messages. For free functions only: `#[pymethods]`
/// sees a macro call in its impl unexpanded, so methods declare their parameters themselves.
macro_rules! py_fn {
    (
        $(#[$($attr:tt)*])*
        $vis:vis fn $name:ident($py:ident; $($params:tt)*) -> $ret:ty $body:block
    ) => {
        $crate::args::py_fn!(
            @param [$(#[$($attr)*])* $vis fn $name($py) -> $ret $body] [] $($params)*
        );
    };
    // The parameters one by one into Rust ones (`'py` is the function's lifetime).
    (@param $head:tt [$($done:tt)*] $p:ident: $t:ty $(, $($rest:tt)*)?) => {
        $crate::args::py_fn!(@param $head [$($done)* $p: $t,] $($($rest)*)?);
    };
    (@param $head:tt [$($done:tt)*] $p:ident? $(, $($rest:tt)*)?) => {
        $crate::args::py_fn!(
            @param $head [$($done)* $p: Option<&pyo3::Bound<'py, pyo3::PyAny>>,] $($($rest)*)?
        );
    };
    (@param $head:tt [$($done:tt)*] $p:ident $(, $($rest:tt)*)?) => {
        $crate::args::py_fn!(
            @param $head [$($done)* $p: &pyo3::Bound<'py, pyo3::PyAny>,] $($($rest)*)?
        );
    };
    (
        @param [$(#[$($attr:tt)*])* $vis:vis fn $name:ident($py:ident) -> $ret:ty $body:block]
        [$($done:tt)*]
    ) => {
        $(#[$($attr)*])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<'py>($py: pyo3::Python<'py>, $($done)*) -> $ret {
            #[allow(dead_code)]
            const F: &str = stringify!($name);
            $body
        }
    };
}
pub(crate) use py_fn;

/// Extracts an integer of type `T` (anything with `__index__`): a non-integer is an
/// `ArgumentTypeError`, an integer outside `range` (described for the message) an
/// `InvalidArgumentError` naming `name` and the value.
pub fn int<'py, T>(name: &str, obj: &Bound<'py, PyAny>, range: &str) -> PyResult<T>
where
    T: FromPyObjectOwned<'py>,
{
    int_or(Kind::InvalidArgument, name, obj, range)
}

/// As [`int`], raising `kind` (e.g. `ConfigError`) for an integer out of range.
pub fn int_or<'py, T>(kind: Kind, name: &str, obj: &Bound<'py, PyAny>, range: &str) -> PyResult<T>
where
    T: FromPyObjectOwned<'py>,
{
    match obj.extract::<T>() {
        Ok(v) => Ok(v),
        Err(e) => {
            let e: PyErr = e.into();
            let py = obj.py();
            let shown = obj
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "?".into());
            if e.is_instance_of::<PyOverflowError>(py) || e.is_instance_of::<PyValueError>(py) {
                Err(error(
                    kind,
                    format!("{name} = {shown} is out of range: must be in {range}"),
                ))
            } else {
                let ty = type_name(obj);
                Err(error(
                    Kind::ArgumentType,
                    format!("{name} must be an integer, got {ty} {shown}"),
                ))
            }
        }
    }
}

/// A sequence id: an integer in [0, 2^64).
pub fn seq_id(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    int::<u64>(name, obj, "[0, 2^64)")
}

/// A 32-bit id (request, layer, head, eviction count): an integer in [0, 2^32).
pub fn id32(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    int::<u32>(name, obj, "[0, 2^32)")
}

/// A size: an integer in [0, 2^63).
pub fn size(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    size_or(Kind::InvalidArgument, name, obj)
}

/// As [`size`], raising `kind` (e.g. `ConfigError`) for an integer out of range.
pub fn size_or(kind: Kind, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    let v = int_or::<u64>(kind, name, obj, "[0, 2^63)")?;
    if v > i64::MAX as u64 {
        return Err(error(
            kind,
            format!("{name} = {v} is out of range: must be in [0, 2^63)"),
        ));
    }
    usize::try_from(v).map_err(|_| error(kind, format!("{name} = {v} does not fit this platform")))
}

/// An optional finite float (None stays None); anything else names the argument.
pub fn opt_float(name: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let v: f64 = obj.extract().map_err(|_| {
        error(
            Kind::ArgumentType,
            format!("{name} must be a float or None, got {}", type_name(obj)),
        )
    })?;
    if !v.is_finite() {
        return Err(error(
            Kind::InvalidArgument,
            format!("{name} = {v} must be finite"),
        ));
    }
    Ok(Some(v))
}

/// An optional argument: `default` when it is not given, else `convert(name, obj)` (e.g.
/// [`seq_id`], [`size`], [`flag`]).
pub fn opt_or<'py, T>(
    name: &str,
    obj: Option<&Bound<'py, PyAny>>,
    default: T,
    convert: impl FnOnce(&str, &Bound<'py, PyAny>) -> PyResult<T>,
) -> PyResult<T> {
    obj.map_or(Ok(default), |o| convert(name, o))
}

/// The Python type name of `obj`, for messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Most token ids one call takes: a sequence's length is an int32 on the device (2^31 - 1).
pub const MAX_TOKENS: usize = i32::MAX as usize;

/// Token ids: a 1-D CPU integer tensor / ndarray (read in place), or any iterable of integers, each
/// in [0, 2^32); at most [`MAX_TOKENS`] of them (checked on `len()` before iterating, so
/// `range(10**12)` is refused at once, and while iterating a generator), bounded before allocation.
pub fn tokens(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let too_many = |n: String| {
        error(
            Kind::InvalidArgument,
            format!(
                "{name} has {n} token ids, more than {MAX_TOKENS} (a sequence length is an int32)"
            ),
        )
    };

    const OF: &str = "integer token ids";
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(not_a_sequence(name, obj, OF));
    }
    if let Some(t) = Tensor::try_extract(name, obj)? {
        return tensor_tokens(name, &t);
    }
    match obj.len() {
        Ok(n) if n > MAX_TOKENS => return Err(too_many(n.to_string())),
        Ok(n) => {
            foresightkv::limits::check_bytes(name, n as u128, 4)
                .map_err(|e| error(Kind::InvalidArgument, e.to_string()))?;
        }
        // __len__ overflowed a Py_ssize_t (e.g. range(2**70)).
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
            return Err(too_many("more than 2^63".into()))
        }
        Err(_) => {}
    }
    let iter = obj.try_iter().map_err(|_| not_a_sequence(name, obj, OF))?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        if i >= MAX_TOKENS {
            return Err(too_many(format!("more than {MAX_TOKENS}")));
        }
        if out.len() == out.capacity() && out.try_reserve(out.len().max(16)).is_err() {
            return Err(error(
                Kind::InvalidArgument,
                format!("{name}: out of memory after {i} token ids"),
            ));
        }
        let item = item?;
        out.push(int::<u32>(&format!("{name}[{i}]"), &item, "[0, 2^32)")?);
    }
    Ok(out)
}

/// The `ArgumentTypeError` of `obj` given for `name`, a sequence `of` what is described.
pub(crate) fn not_a_sequence(name: &str, obj: &Bound<'_, PyAny>, of: &str) -> PyErr {
    error(
        Kind::ArgumentType,
        format!("{name} must be a sequence of {of}, got {}", type_name(obj)),
    )
}

/// The values of a 1-D CPU int32 / int64 tensor or ndarray, read in place.
pub(crate) fn tensor_ints(t: &Tensor<'_>) -> PyResult<Vec<i64>> {
    t.expect_cpu()?;
    t.expect_ndim(1)?;
    t.expect_dtype(&[ElemType::I32, ElemType::I64])?;
    // SAFETY: dtype, device (CPU) and extent were checked; reads only.
    Ok(match t.dtype {
        ElemType::I32 => unsafe { t.read_strided::<i32>() }
            .into_iter()
            .map(i64::from)
            .collect(),
        _ => unsafe { t.read_strided::<i64>() },
    })
}

fn tensor_tokens(name: &str, t: &Tensor<'_>) -> PyResult<Vec<u32>> {
    let bad = |i: usize, v: i64| {
        error(
            Kind::InvalidArgument,
            format!("{name}[{i}] = {v} is out of range: must be in [0, 2^32)"),
        )
    };
    tensor_ints(t)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| u32::try_from(v).map_err(|_| bad(i, v)))
        .collect()
}

/// A boolean flag: `True` / `False` (numpy bools too); anything else names the argument.
pub fn flag(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    obj.extract::<bool>().map_err(|_| {
        error(
            Kind::ArgumentType,
            format!("{name} must be True or False, got {}", type_name(obj)),
        )
    })
}

/// An optional statistics mode by name (`"paper"` or `"official"`; None = the paper's default).
pub fn stats_mode(
    name: &str,
    obj: Option<&Bound<'_, PyAny>>,
) -> PyResult<foresightkv::kernels::StatsMode> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(foresightkv::kernels::StatsMode::default());
    };
    let s: String = obj.extract().map_err(|_| {
        error(
            Kind::ArgumentType,
            format!(
                "{name} must be 'paper' or 'official', got {}",
                type_name(obj)
            ),
        )
    })?;
    foresightkv::kernels::StatsMode::parse(&s).ok_or_else(|| {
        error(
            Kind::InvalidArgument,
            format!("{name} = {s:?} is not a statistics mode: must be 'paper' or 'official'"),
        )
    })
}
