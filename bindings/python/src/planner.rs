//! `WindowPlanner` for Python: the core's batched eviction planner (`block::WindowPlanner`), one call
//! per engine forward over columns of the batch, answering with flat int32 / int64 buffers
//! (`array.array`, ready for `torch.frombuffer`) so the engine step builds its tensors once.

use crate::args;
use crate::errors::{block_error, error, Kind};
use crate::tensor::Tensor;
use foresightkv::block::{
    EvictionConfig, Schedule, StepPlan, StepRequest, WindowError, WindowPlanner,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

/// The int32 rows of a plan, in the order `plan` returns them (see `WindowPlanner.FIELDS`).
const FIELDS: [&str; 12] = [
    "seq_lens",
    "num_new",
    "query_starts",
    "live_starts",
    "protected_lens",
    "bases",
    "evict_to",
    "window_lens",
    "attn_starts",
    "evict_starts",
    "slots",
    "num_queries",
];

/// The int64 columns of the committed evictions, in the order `plan` returns them.
const RELEASED_FIELDS: [&str; 5] = [
    "key",
    "old_live_start",
    "new_live_start",
    "protected_len",
    "evicted_from",
];

/// Python exception of a planner error: every refusal is about the rows' sizes (`ShapeError`),
/// except a key that does not fit int64 (`InvalidArgumentError`).
fn window_error(e: WindowError) -> PyErr {
    let kind = match e {
        WindowError::KeyTooLarge(_) => Kind::InvalidArgument,
        WindowError::TooManyRequests { .. } => Kind::Capacity,
        _ => Kind::Shape,
    };
    error(kind, format!("WindowPlanner.plan: {e}"))
}

/// `array.array(code, data)` over the native-endian bytes of `data`.
pub(crate) fn array<'py>(py: Python<'py>, code: &str, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    static ARRAY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let cls = ARRAY.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("array")?.getattr("array")?.unbind())
    })?;
    cls.bind(py).call1((code, PyBytes::new(py, data)))
}

/// The native-endian bytes of `vals` (a plain integer slice: no padding, every byte initialised).
pub(crate) fn as_bytes<T: Copy + Into<i64>>(vals: &[T]) -> &[u8] {
    // SAFETY: `T` is a primitive integer (the `Into<i64>` bound admits no other type with padding);
    // the slice covers exactly the memory of `vals`, borrowed for the same lifetime.
    unsafe { std::slice::from_raw_parts(vals.as_ptr().cast::<u8>(), std::mem::size_of_val(vals)) }
}

fn bytes_i32<'a>(out: &mut Vec<u8>, cols: impl IntoIterator<Item = &'a [i32]>) {
    for c in cols {
        out.extend_from_slice(as_bytes(c));
    }
}

fn bytes_i64(out: &mut Vec<u8>, vals: impl IntoIterator<Item = i64>) {
    for v in vals {
        out.extend_from_slice(&v.to_ne_bytes());
    }
}

/// The integers (or bools) of a list or tuple, read in place: the common case, a few nanoseconds an
/// element (no iterator, no reference counting; `True`/`False` and exact `int`s are recognised by
/// pointer, without a call). `None` for any other object or an element that is not an `int` (the
/// general path after it then handles the object or names the offending element).
fn int_items(obj: &Bound<'_, PyAny>) -> Option<Vec<i64>> {
    use pyo3::ffi;
    type GetItem = unsafe extern "C" fn(*mut ffi::PyObject, ffi::Py_ssize_t) -> *mut ffi::PyObject;
    let (n, get): (usize, GetItem) = if let Ok(l) = obj.cast::<PyList>() {
        (l.len(), ffi::PyList_GetItem)
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        (t.len(), ffi::PyTuple_GetItem)
    } else {
        return None;
    };
    // SAFETY: addresses of the interpreter's static singletons and of the `int` type object.
    let (t, f, int_type) = unsafe {
        (
            ffi::Py_True(),
            ffi::Py_False(),
            std::ptr::addr_of_mut!(ffi::PyLong_Type),
        )
    };
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: the GIL is held and nothing below runs Python code (PyLong_AsLongLong of an
        // `int` instance reads its value, it calls no `__index__`), so the list cannot change
        // under the loop and the borrowed item stays alive; `i < n` = its length.
        let x = unsafe {
            let item = get(obj.as_ptr(), i as ffi::Py_ssize_t);
            if item == f {
                0
            } else if item == t {
                1
            } else {
                if item.is_null()
                    || (ffi::Py_TYPE(item) != int_type && ffi::PyLong_Check(item) == 0)
                {
                    ffi::PyErr_Clear();
                    return None;
                }
                let x = ffi::PyLong_AsLongLong(item);
                if x == -1 && !ffi::PyErr_Occurred().is_null() {
                    ffi::PyErr_Clear(); // out of int64 range: the general path names it
                    return None;
                }
                x
            }
        };
        v.push(x);
    }
    Some(v)
}

/// One column of the batch as int64: a 1-D CPU int32/int64 tensor or ndarray (read in place), or a
/// sequence of integers (`bools`: of Python bools or integers, nonzero = true).
pub(crate) fn column(name: &str, obj: &Bound<'_, PyAny>, bools: bool) -> PyResult<Vec<i64>> {
    const OF: &str = "integers";
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(args::not_a_sequence(name, obj, OF));
    }
    if let Some(t) = Tensor::try_extract(name, obj)? {
        return args::tensor_ints(&t);
    }
    if let Some(v) = int_items(obj) {
        return Ok(v);
    }
    if let Ok(v) = obj.extract::<Vec<i64>>() {
        return Ok(v);
    }
    if bools {
        if let Ok(v) = obj.extract::<Vec<bool>>() {
            return Ok(v.into_iter().map(i64::from).collect());
        }
    }
    // Slow path only to name the offending element.
    let iter = obj
        .try_iter()
        .map_err(|_| args::not_a_sequence(name, obj, OF))?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let item = item?;
        let v = if bools {
            args::flag(&format!("{name}[{i}]"), &item).map(i64::from)
        } else {
            args::int::<i64>(&format!("{name}[{i}]"), &item, "[-2^63, 2^63)")
        }?;
        out.push(v);
    }
    Ok(out)
}

fn nonneg(name: &str, i: usize, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| {
        error(
            Kind::InvalidArgument,
            format!("{name}[{i}] = {v} is out of range: must be in [0, 2^63)"),
        )
    })
}

/// The batched eviction planner of an engine (one per model): every request's live window keyed by
/// a stable integer key, planned one forward at a time (`plan`), the previous forward's evictions
/// committed one step late.
#[pyclass(module = "foresightkv", name = "WindowPlanner")]
pub struct PyWindowPlanner {
    inner: WindowPlanner,
    out: StepPlan,
    rows: Vec<StepRequest>,
}

#[pymethods]
impl PyWindowPlanner {
    /// A planner for budget `B`, interval `L` and `block_size` (checked by the cache configuration's
    /// rules), in protect mode or not; `evicts=False` for a policy that never evicts.
    /// `max_slots`: the most requests holding state at once (the request slots reserved at
    /// start-up; None = unbounded); a plan past it raises `CapacityError`.
    #[new]
    #[pyo3(signature = (budget, interval, block_size, protect_prompt = false, evicts = true, max_slots = None))]
    fn new(
        budget: &Bound<'_, PyAny>,
        interval: &Bound<'_, PyAny>,
        block_size: &Bound<'_, PyAny>,
        protect_prompt: bool,
        evicts: bool,
        max_slots: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let ev = EvictionConfig {
            budget: args::size_or(Kind::Config, "budget", budget)?,
            interval: args::size_or(Kind::Config, "interval", interval)?,
            protect_prompt,
        };
        let bs = args::size_or(Kind::Config, "block_size", block_size)?;
        let schedule = Schedule::new(&ev, bs).map_err(block_error)?;
        let mut inner = WindowPlanner::new(schedule, evicts);
        if let Some(m) = max_slots.filter(|m| !m.is_none()) {
            let m = args::size_or(Kind::Config, "max_slots", m)?;
            if !inner.set_max_slots(Some(m)) {
                return Err(error(
                    Kind::Config,
                    format!("max_slots = {m} is out of range"),
                ));
            }
        }
        Ok(Self {
            inner,
            out: StepPlan::default(),
            rows: Vec::new(),
        })
    }

    /// Bounds the requests holding state to `max_slots` (None = unbounded); refused with
    /// `CapacityError` while more requests hold state, or one holds a slot at or past it.
    #[pyo3(signature = (max_slots))]
    fn set_max_slots(&mut self, max_slots: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let m = match max_slots.filter(|m| !m.is_none()) {
            Some(m) => Some(args::size_or(Kind::Config, "max_slots", m)?),
            None => None,
        };
        if !self.inner.set_max_slots(m) {
            return Err(error(
                Kind::Capacity,
                format!(
                    "max_slots = {m:?}: {} requests hold state (or a slot past it)",
                    self.inner.num_requests()
                ),
            ));
        }
        Ok(())
    }

    /// The bound on requests holding state (None = unbounded).
    #[getter]
    fn max_slots(&self) -> Option<usize> {
        self.inner.max_slots()
    }

    /// Names of the int32 rows `plan` returns, in order.
    #[classattr]
    #[allow(non_snake_case)]
    fn FIELDS<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, FIELDS)
    }

    /// Names of the int64 columns of the committed evictions `plan` returns, in order.
    #[classattr]
    #[allow(non_snake_case)]
    fn RELEASED_FIELDS<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, RELEASED_FIELDS)
    }

    /// Plans one forward. Columns (one entry per request row, batch order): `keys` (integers in
    /// [0, 2^63)), `seq_lens` (length after the forward), `num_new` (tokens it adds), `prefill`
    /// (prompt tokens), `reset` (the request starts over), optional `prompt_lens` (the request's
    /// whole prompt, -1 = unknown). Returns `(rows, serials, released, dropped, num_tokens)`:
    /// `rows` int32 `[len(FIELDS), n]` row major, `serials` int64 `[n]`, `released` int64
    /// `[m, len(RELEASED_FIELDS)]` row major (the previous forward's evictions, committed now),
    /// `dropped` int64 (serials of states replaced by resets), all `array.array`. Atomic: on error
    /// nothing changed.
    #[pyo3(signature = (keys, seq_lens, num_new, prefill, reset, prompt_lens = None))]
    #[allow(clippy::too_many_arguments)] // the columns of the Python-facing call
    fn plan<'py>(
        &mut self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        seq_lens: &Bound<'py, PyAny>,
        num_new: &Bound<'py, PyAny>,
        prefill: &Bound<'py, PyAny>,
        reset: &Bound<'py, PyAny>,
        prompt_lens: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let k = column("keys", keys, false)?;
        let n = k.len();
        let cols = [
            ("seq_lens", column("seq_lens", seq_lens, false)?),
            ("num_new", column("num_new", num_new, false)?),
            ("prefill", column("prefill", prefill, true)?),
            ("reset", column("reset", reset, true)?),
        ];
        let prompts = match prompt_lens.filter(|p| !p.is_none()) {
            Some(p) => Some(column("prompt_lens", p, false)?),
            None => None,
        };
        for (name, c) in cols
            .iter()
            .map(|(n, c)| (*n, c))
            .chain(prompts.iter().map(|c| ("prompt_lens", c)))
        {
            if c.len() != n {
                return Err(error(
                    Kind::Shape,
                    format!("{name} has {} entries for {n} keys", c.len()),
                ));
            }
        }
        let [(_, lens), (_, new), (_, pre), (_, res)] = &cols;
        self.rows.clear();
        self.rows.reserve(n);
        for i in 0..n {
            self.rows.push(StepRequest {
                key: nonneg("keys", i, k[i])? as u64,
                seq_len: nonneg("seq_lens", i, lens[i])?,
                num_new: nonneg("num_new", i, new[i])?,
                prefill: pre[i] != 0,
                reset: res[i] != 0,
                prompt_len: match &prompts {
                    Some(p) if p[i] >= 0 => Some(p[i] as usize),
                    _ => None,
                },
            });
        }
        let (inner, out, rows) = (&mut self.inner, &mut self.out, &self.rows);
        py.detach(|| inner.plan(rows, out)).map_err(window_error)?;
        let out = &self.out;
        let mut buf = Vec::with_capacity(FIELDS.len() * n * 4);
        bytes_i32(
            &mut buf,
            [
                &out.seq_lens[..],
                &out.num_new,
                &out.query_starts,
                &out.live_starts,
                &out.protected_lens,
                &out.bases,
                &out.evict_to,
                &out.window_lens,
                &out.attn_starts,
                &out.evict_starts,
                &out.slots,
                &out.num_queries,
            ],
        );
        let rows = array(py, "i", &buf)?;
        let serials = array(py, "q", as_bytes(&out.serials))?;
        buf.clear();
        bytes_i64(
            &mut buf,
            out.released.iter().flat_map(|a| {
                [
                    a.key as i64,
                    a.old_live_start as i64,
                    a.new_live_start as i64,
                    a.protected_len as i64,
                    a.evicted_from() as i64,
                ]
            }),
        );
        let released = array(py, "q", &buf)?;
        buf.clear();
        bytes_i64(&mut buf, out.dropped.iter().map(|s| *s as i64));
        let dropped = array(py, "q", &buf)?;
        PyTuple::new(
            py,
            [
                rows,
                serials,
                released,
                dropped,
                out.num_tokens.into_pyobject(py)?.into_any(),
            ],
        )
    }

    /// `(serial, length, live_start, pending, protected_len, slot)` of request `key` (`pending` is
    /// the `live_start` the last forward's eviction moves it to, or None), or None for an unknown key.
    fn state<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let key = args::seq_id("key", key)?;
        let Some(s) = self.inner.state(key) else {
            return Ok(None);
        };
        let w = s.window;
        let t = (
            s.serial,
            w.len,
            w.live_start,
            s.pending,
            w.protected_len,
            s.slot,
        );
        Ok(Some(t.into_pyobject(py)?))
    }

    /// Keys of the requests with state (any order).
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.inner.keys())
    }

    /// Forgets request `key` (finished, aborted, preempted): its pending eviction is dropped.
    /// Returns the serial its state had, or None for an unknown key.
    fn release(&mut self, key: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        let key = args::seq_id("key", key)?;
        Ok(self.inner.release(key))
    }

    /// Requests with state.
    fn __len__(&self) -> usize {
        self.inner.num_requests()
    }

    fn __repr__(&self) -> String {
        let s = self.inner.schedule();
        format!(
            "WindowPlanner(budget={}, interval={}, block_size={}, protect_prompt={}, requests={})",
            s.budget,
            s.interval,
            s.block_size,
            if s.protect_prompt { "True" } else { "False" },
            self.inner.num_requests()
        )
    }
}
