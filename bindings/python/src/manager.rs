//! `KvCacheManager` for Python: the core manager behind an `Arc`, shared by every Python thread, with
//! the GIL released around each call; block tables come back as int32 buffers.

use crate::args::{self, seq_id};
use crate::config::PyCacheConfig;
use crate::errors::{block_error, error, Kind};
use crate::planner::{array, as_bytes, column};
use foresightkv::block::{
    BlockError, EvictionPlan, FlatBlockTables, KvCacheManager, StepOp, StepOutput,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;

/// What the next eviction of a sequence does.
#[pyclass(module = "foresightkv", name = "EvictionPlan", frozen, get_all, eq)]
#[derive(Clone, PartialEq)]
pub struct PyEvictionPlan {
    /// Sequence length when the eviction is applied.
    pub len: usize,
    /// `live_start` before the eviction.
    pub live_start_before: usize,
    /// `live_start` after the eviction.
    pub live_start_after: usize,
    /// Entries each (layer, KV head) evicts.
    pub evicted_per_head: usize,
    /// Block-table entries the eviction empties.
    pub released_blocks: usize,
}

impl From<EvictionPlan> for PyEvictionPlan {
    fn from(p: EvictionPlan) -> Self {
        Self {
            len: p.len,
            live_start_before: p.live_start_before,
            live_start_after: p.live_start_after,
            evicted_per_head: p.evicted_per_head,
            released_blocks: p.released_blocks,
        }
    }
}

#[pymethods]
impl PyEvictionPlan {
    fn __repr__(&self) -> String {
        format!(
            "EvictionPlan(len={}, live_start_before={}, live_start_after={}, evicted_per_head={}, released_blocks={})",
            self.len, self.live_start_before, self.live_start_after, self.evicted_per_head, self.released_blocks
        )
    }
}

/// Block tables of a batch: int32 buffers (`array.array('i')`) ready for `torch.frombuffer` /
/// `numpy.frombuffer`, or converted with `as_numpy()` / `as_torch()`.
#[pyclass(module = "foresightkv", name = "BlockTables", frozen)]
pub struct PyBlockTables {
    num_seqs: usize,
    tables: FlatBlockTables,
}

fn int32_array<'py>(py: Python<'py>, values: &[i32]) -> PyResult<Bound<'py, PyAny>> {
    array(py, "i", as_bytes(values))
}

impl PyBlockTables {
    /// The four arrays converted by `conv`, the table reshaped to `[num_seqs, width]`.
    fn tuple<'py>(
        &self,
        py: Python<'py>,
        conv: impl Fn(&[i32]) -> PyResult<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let t = &self.tables;
        let table = conv(&t.table)?.call_method1("reshape", (self.num_seqs, t.width))?;
        let out = (
            table,
            conv(&t.live_starts)?,
            conv(&t.lens)?,
            conv(&t.protected_lens)?,
        );
        Ok(out.into_pyobject(py)?.into_any())
    }
}

#[pymethods]
impl PyBlockTables {
    /// Rows (sequences).
    #[getter]
    fn num_seqs(&self) -> usize {
        self.num_seqs
    }

    /// Columns: the longest table of the batch.
    #[getter]
    fn width(&self) -> usize {
        self.tables.width
    }

    /// `num_seqs * width` block ids, row major; -1 = empty (released or past the end).
    #[getter]
    fn table<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        int32_array(py, &self.tables.table)
    }

    /// Block-aligned live start of each row.
    #[getter]
    fn live_starts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        int32_array(py, &self.tables.live_starts)
    }

    /// Length (tokens) of each row.
    #[getter]
    fn lens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        int32_array(py, &self.tables.lens)
    }

    /// Protected prefix of each row.
    #[getter]
    fn protected_lens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        int32_array(py, &self.tables.protected_lens)
    }

    /// `(table [num_seqs, width], live_starts, lens, protected_lens)` as int32 numpy arrays (over
    /// fresh buffers, no further copy).
    fn as_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let np = py.import("numpy")?;
        let conv = |v: &[i32]| -> PyResult<Bound<'py, PyAny>> {
            np.call_method1("frombuffer", (int32_array(py, v)?, "int32"))
        };
        self.tuple(py, conv)
    }

    /// `(table [num_seqs, width], live_starts, lens, protected_lens)` as int32 torch tensors on
    /// `device` (CPU when None; CPU tensors share fresh buffers, no further copy).
    #[pyo3(signature = (device = None))]
    fn as_torch<'py>(
        &self,
        py: Python<'py>,
        device: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let torch = py.import("torch")?;
        let int32 = torch.getattr("int32")?;
        let conv = |v: &[i32]| -> PyResult<Bound<'py, PyAny>> {
            let kwargs = PyDict::new(py);
            kwargs.set_item("dtype", &int32)?;
            let t = if v.is_empty() {
                torch.call_method("empty", (0,), Some(&kwargs))?
            } else {
                torch.call_method("frombuffer", (int32_array(py, v)?,), Some(&kwargs))?
            };
            match device {
                Some(d) if !d.is_none() => t.call_method1("to", (d,)),
                _ => Ok(t),
            }
        };
        self.tuple(py, conv)
    }

    fn __repr__(&self) -> String {
        format!(
            "BlockTables(num_seqs={}, width={})",
            self.num_seqs, self.tables.width
        )
    }
}

/// The paged KV-cache manager: sequences, slot mappings, live windows, eviction schedule,
/// compaction, prefix sharing, copy-on-write. Safe to share between Python threads.
#[pyclass(module = "foresightkv", name = "KvCacheManager", frozen)]
pub struct PyKvCacheManager {
    inner: Arc<KvCacheManager>,
    config: Py<PyCacheConfig>,
}

impl PyKvCacheManager {
    fn run<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&KvCacheManager) -> T + Send) -> T {
        let m = self.inner.clone();
        py.detach(move || f(&m))
    }

    /// [`Self::run`] of a manager call on the sequence `seq_id` (the argument of that name).
    fn on_seq<T: Send>(
        &self,
        py: Python<'_>,
        seq_id: &Bound<'_, PyAny>,
        f: impl FnOnce(&KvCacheManager, u64) -> Result<T, BlockError> + Send,
    ) -> PyResult<T> {
        let id = args::seq_id("seq_id", seq_id)?;
        self.run(py, |m| f(m, id)).map_err(block_error)
    }

    /// [`Self::on_seq`] of a call that also takes token ids (the argument `name`, read after the id).
    fn on_seq_tokens<T: Send>(
        &self,
        py: Python<'_>,
        seq_id: &Bound<'_, PyAny>,
        name: &str,
        tokens: &Bound<'_, PyAny>,
        f: impl FnOnce(&KvCacheManager, u64, &[u32]) -> Result<T, BlockError> + Send,
    ) -> PyResult<T> {
        let id = args::seq_id("seq_id", seq_id)?;
        let tokens = args::tokens(name, tokens)?;
        self.run(py, |m| f(m, id, &tokens)).map_err(block_error)
    }
}

#[pymethods]
impl PyKvCacheManager {
    #[new]
    fn new(config: &Bound<'_, PyAny>) -> PyResult<Self> {
        let cfg = config.cast::<PyCacheConfig>().map_err(|_| {
            error(
                Kind::ArgumentType,
                format!(
                    "config must be a CacheConfig, got {}",
                    args::type_name(config)
                ),
            )
        })?;
        let inner = KvCacheManager::new(cfg.get().inner.clone()).map_err(block_error)?;
        Ok(Self {
            inner: Arc::new(inner),
            config: cfg.clone().unbind(),
        })
    }

    /// The configuration the manager was built with.
    #[getter]
    fn config(&self, py: Python<'_>) -> Py<PyCacheConfig> {
        self.config.clone_ref(py)
    }

    /// Blocks in the pool.
    #[getter]
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }

    /// Free blocks now.
    #[getter]
    fn num_free_blocks(&self, py: Python<'_>) -> usize {
        self.run(py, |m| m.num_free_blocks())
    }

    /// Registered sequences.
    #[getter]
    fn num_sequences(&self, py: Python<'_>) -> usize {
        self.run(py, |m| m.num_sequences())
    }

    /// Most blocks one sequence holds at once while its prompt grows to `max_len` tokens.
    fn max_blocks_held(
        &self,
        prompt_len: &Bound<'_, PyAny>,
        max_len: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let prompt_len = args::size("prompt_len", prompt_len)?;
        let max_len = args::size("max_len", max_len)?;
        if max_len > i32::MAX as usize {
            return Err(error(
                Kind::InvalidArgument,
                format!("max_len = {max_len} is beyond what the int32 device tables address"),
            ));
        }
        Ok(self.inner.max_blocks_held(prompt_len, max_len))
    }

    /// Registers a sequence with its prompt token ids; returns the prompt's slot mapping (-1 for
    /// positions reused from the prefix cache).
    fn add_sequence(
        &self,
        py: Python<'_>,
        seq_id: &Bound<'_, PyAny>,
        prompt: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<i64>> {
        self.on_seq_tokens(py, seq_id, "prompt", prompt, KvCacheManager::add_sequence)
    }

    /// Appends generated token ids; returns their slots. Refused while an eviction is due.
    fn append(
        &self,
        py: Python<'_>,
        seq_id: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<i64>> {
        self.on_seq_tokens(py, seq_id, "tokens", tokens, KvCacheManager::append)
    }

    /// The eviction due now, or None.
    fn eviction_due(
        &self,
        py: Python<'_>,
        seq_id: &Bound<'_, PyAny>,
    ) -> PyResult<Option<PyEvictionPlan>> {
        Ok(self
            .on_seq(py, seq_id, KvCacheManager::eviction_due)?
            .map(Into::into))
    }

    /// Applies the due eviction (after the compaction kernel ran); returns the released block ids.
    fn compact(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        self.on_seq(py, seq_id, KvCacheManager::compact)
    }

    /// Names of the operation codes `apply_step` takes, by code (0 = add, ...).
    #[classattr]
    #[allow(non_snake_case)]
    fn STEP_OPS<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, ["add", "append", "compact", "free", "preempt"])
    }

    /// Applies one scheduler step's operations in order with one call: `ops` codes (see
    /// `STEP_OPS`), `seq_ids`, `counts` (tokens of each add / append, ignored otherwise) and `tokens`
    /// (the token ids of every add and append, concatenated in order). Returns `(slots, released,
    /// released_counts, preempted, preempted_counts)` as `array.array`: the slots of every add and
    /// append, the blocks every compact released (and how many per compact), the tokens every
    /// preempt returned (and how many per preempt). Stops at the first refused operation and raises
    /// its error; the operations before it stay applied.
    fn apply_step<'py>(
        &self,
        py: Python<'py>,
        ops: &Bound<'py, PyAny>,
        seq_ids: &Bound<'py, PyAny>,
        counts: &Bound<'py, PyAny>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let kinds = column("ops", ops, false)?;
        let ids = column("seq_ids", seq_ids, false)?;
        let counts = column("counts", counts, false)?;
        let toks = column("tokens", tokens, false)?;
        let n = kinds.len();
        if ids.len() != n || counts.len() != n {
            return Err(error(
                Kind::Shape,
                format!(
                    "apply_step: {n} ops, {} seq_ids, {} counts",
                    ids.len(),
                    counts.len()
                ),
            ));
        }
        let toks: Vec<u32> = toks
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                u32::try_from(t).map_err(|_| {
                    error(
                        Kind::InvalidArgument,
                        format!("tokens[{i}] = {t} is out of range: must be in [0, 2^32)"),
                    )
                })
            })
            .collect::<PyResult<_>>()?;
        let mut step = Vec::with_capacity(n);
        let mut at = 0usize;
        for i in 0..n {
            let id = u64::try_from(ids[i]).map_err(|_| {
                error(
                    Kind::InvalidArgument,
                    format!(
                        "seq_ids[{i}] = {} is out of range: must be in [0, 2^63)",
                        ids[i]
                    ),
                )
            })?;
            let mut take = || -> PyResult<&[u32]> {
                let c = usize::try_from(counts[i])
                    .ok()
                    .filter(|c| at + c <= toks.len())
                    .ok_or_else(|| {
                        error(
                            Kind::Shape,
                            format!(
                                "counts[{i}] = {} does not fit the {} tokens left",
                                counts[i],
                                toks.len() - at
                            ),
                        )
                    })?;
                at += c;
                Ok(&toks[at - c..at])
            };
            step.push(match kinds[i] {
                0 => StepOp::Add {
                    id,
                    prompt: take()?,
                },
                1 => StepOp::Append {
                    id,
                    tokens: take()?,
                },
                2 => StepOp::Compact(id),
                3 => StepOp::Free(id),
                4 => StepOp::Preempt(id),
                k => {
                    return Err(error(
                        Kind::InvalidArgument,
                        format!("ops[{i}] = {k} is not an operation code (0 = add .. 4 = preempt)"),
                    ))
                }
            });
        }
        if at != toks.len() {
            return Err(error(
                Kind::Shape,
                format!(
                    "tokens has {} entries, the adds and appends take {at}",
                    toks.len()
                ),
            ));
        }
        let mut out = StepOutput::default();
        let m = self.inner.clone();
        py.detach(|| m.apply_step(&step, &mut out))
            .map_err(|(_, e)| block_error(e))?;
        let u32s = |vals: &[u32]| array(py, "I", as_bytes(vals));
        PyTuple::new(
            py,
            [
                array(py, "q", as_bytes(&out.slots))?,
                u32s(&out.released)?,
                u32s(&out.released_counts)?,
                u32s(&out.preempted)?,
                u32s(&out.preempted_counts)?,
            ],
        )
    }

    /// Registers `child` sharing all blocks of `parent` (copy-on-write).
    fn fork(
        &self,
        py: Python<'_>,
        parent: &Bound<'_, PyAny>,
        child: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let parent = args::seq_id("parent", parent)?;
        let child = args::seq_id("child", child)?;
        self.run(py, |m| m.fork(parent, child)).map_err(block_error)
    }

    /// Removes a sequence and releases its blocks.
    fn free(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<()> {
        self.on_seq(py, seq_id, KvCacheManager::free)
    }

    /// Removes a sequence and returns all its token ids, to resume it later with `add_sequence`.
    fn preempt(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        self.on_seq(py, seq_id, KvCacheManager::preempt)
    }

    /// Pending block copies `(src, dst)` from copy-on-write; perform them before the next allocation.
    fn take_copies(&self, py: Python<'_>) -> Vec<(u32, u32)> {
        self.run(py, |m| m.take_copies())
            .into_iter()
            .map(|c| (c.src, c.dst))
            .collect()
    }

    /// Tokens in the sequence.
    fn seq_len(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.on_seq(py, seq_id, KvCacheManager::seq_len)
    }

    /// Block-aligned start of the live window.
    fn live_start(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.on_seq(py, seq_id, KvCacheManager::live_start)
    }

    /// Protected prefix length (block-aligned prompt in protect mode, else 0).
    fn protected_len(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.on_seq(py, seq_id, KvCacheManager::protected_len)
    }

    /// KV entries attention reads per (layer, head).
    fn live_tokens(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.on_seq(py, seq_id, KvCacheManager::live_tokens)
    }

    /// Blocks the sequence references now.
    fn blocks_held(&self, py: Python<'_>, seq_id: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.on_seq(py, seq_id, KvCacheManager::blocks_held)
    }

    /// Block tables, live starts, lengths and protected prefixes of `seq_ids`, one row each.
    fn block_tables(&self, py: Python<'_>, seq_ids: &Bound<'_, PyAny>) -> PyResult<PyBlockTables> {
        let iter = seq_ids.try_iter().map_err(|_| {
            error(
                Kind::ArgumentType,
                format!(
                    "seq_ids must be an iterable of sequence ids, got {}",
                    args::type_name(seq_ids)
                ),
            )
        })?;
        let ids = iter
            .enumerate()
            .map(|(i, item)| seq_id(&format!("seq_ids[{i}]"), &item?))
            .collect::<PyResult<Vec<u64>>>()?;
        let tables = self
            .run(py, |m| m.block_tables(&ids))
            .map_err(block_error)?;
        Ok(PyBlockTables {
            num_seqs: ids.len(),
            tables,
        })
    }

    /// A consistent copy of the whole state as plain Python data (for invariant checks):
    /// `refcounts`, `free_queue`, `cached` [(hash, block)], `pending_copies` [(src, dst)],
    /// `sequences` {id: {tokens, prompt_len, protected_len, live_start, blocks, compactions}}.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.run(py, |m| m.snapshot());
        let out = PyDict::new(py);
        out.set_item("refcounts", snap.refcounts)?;
        out.set_item("free_queue", snap.free_queue)?;
        out.set_item("cached", snap.cached)?;
        let copies: Vec<(u32, u32)> = snap.pending_copies.iter().map(|c| (c.src, c.dst)).collect();
        out.set_item("pending_copies", copies)?;
        let seqs = PyDict::new(py);
        for (id, t) in snap.sequences {
            let d = PyDict::new(py);
            d.set_item("tokens", t.tokens)?;
            d.set_item("prompt_len", t.prompt_len)?;
            d.set_item("protected_len", t.window.protected_len)?;
            d.set_item("live_start", t.window.live_start)?;
            d.set_item("blocks", t.blocks)?;
            d.set_item("compactions", t.compactions)?;
            seqs.set_item(id, d)?;
        }
        out.set_item("sequences", seqs)?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "KvCacheManager(num_blocks={}, num_free_blocks={}, num_sequences={})",
            self.inner.num_blocks(),
            self.inner.num_free_blocks(),
            self.inner.num_sequences()
        )
    }
}
