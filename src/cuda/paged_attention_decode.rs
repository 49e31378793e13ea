//! Launcher of `fkv_paged_attention_decode` (+ its split-KV merge) over caller-owned device memory.

use super::paged::{grid_dim, DeviceArray, Launch, PagedLaunch};
use super::CudaError;
use crate::kernels::{DecodeArgs, KernelError, PagedKvLayout};

use super::params::{FKV_DECODE_GCHUNK, FKV_DECODE_SHARED_LIMIT, FKV_DECODE_THREADS};

/// How a decode call is split: live slots per partition, partitions, and workspace it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// Live slots per partition (a thread block).
    pub partition_size: i64,
    /// Partitions per (sequence, KV head); 1 means no merge and no workspace.
    pub num_partitions: i64,
    /// f32 elements of workspace needed (0 when `num_partitions == 1`).
    pub workspace_len: usize,
    /// Dynamic shared memory per block in bytes.
    pub shared_bytes: u32,
}

/// Plans a decode of `num_seqs` sequences whose longest live window is `max_live`.
///
/// The partition is the largest of 512, 256, ..., 32 slots whose logits fit in shared memory next
/// to the group's queries; longer windows are split across blocks and merged by log-sum-exp.
pub fn plan_decode(
    kv: &PagedKvLayout,
    num_q_heads: i64,
    num_seqs: usize,
    max_live: usize,
) -> Result<DecodePlan, KernelError> {
    let g = crate::kernels::paged::group_size(num_q_heads, kv.num_kv_heads)?;
    let hd = kv.head_dim;
    let bytes = |p: i64| 4 * (g * hd + g * p + 2 * g + FKV_DECODE_GCHUNK as i64 * hd);
    let partition_size = [512i64, 256, 128, 64, 32]
        .into_iter()
        .find(|&p| bytes(p) <= FKV_DECODE_SHARED_LIMIT as i64)
        .ok_or_else(|| KernelError::InvalidArgument {
            name: "num_q_heads",
            why: format!("a GQA group of {g} heads of dim {hd} does not fit the decode kernel's shared memory"),
        })?;
    let num_partitions = (max_live as i64 + partition_size - 1) / partition_size;
    let num_partitions = num_partitions.max(1);
    let workspace_len = if num_partitions > 1 {
        num_seqs * num_q_heads as usize * num_partitions as usize * (hd as usize + 2)
    } else {
        0
    };
    Ok(DecodePlan {
        partition_size,
        num_partitions,
        workspace_len,
        shared_bytes: bytes(partition_size) as u32,
    })
}

/// Enqueues paged decode attention on `at`'s stream and device: same contract as
/// [`crate::kernels::paged_attention_decode`], `query` and `out` in `at.dtype`. `workspace` (f32) must hold [`plan_decode`]'s `workspace_len` (may be empty when that
/// is 0). Everything is validated before launch; block ids are bounds-checked on the device (an
/// out-of-range block's slots are skipped).
///
/// # Safety
/// The pointers must be device memory of `at.ordinal` holding the lengths given, alive until the
/// kernels complete; ``at.windows`' device arrays must match their host mirrors; `stream` must belong
/// to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_paged_attention_decode(
    at: &PagedLaunch<'_>,
    args: &DecodeArgs,
    query: DeviceArray,
    out: DeviceArray,
    workspace: DeviceArray,
) -> Result<DecodePlan, CudaError> {
    at.validate()?;
    let (kv, windows) = (at.kv, at.windows);
    let n = windows.num_seqs();
    args.validate(kv, n, query.len, out.len)?;
    let plan = plan_decode(kv, args.num_q_heads, n, windows.max_live())?;
    if n == 0 {
        return Ok(plan);
    }
    query.non_null("query")?;
    out.non_null("out")?;
    if plan.workspace_len > 0 {
        workspace.holding("workspace", plan.workspace_len)?;
    }
    let grid = (
        kv.num_kv_heads as u32,
        grid_dim("num_seqs", n)?,
        grid_dim("num_partitions", plan.num_partitions as usize)?,
    );
    let p = super::params::fkv_decode_params {
        kv: at.raw_cache(),
        win: windows.raw(),
        query: query.ptr as *const _,
        out: out.ptr as *mut _,
        workspace: workspace.ptr as *mut f32,
        q_stride_seq: args.query_strides[0],
        q_stride_head: args.query_strides[1],
        o_stride_seq: args.out_strides[0],
        o_stride_head: args.out_strides[1],
        num_q_heads: args.num_q_heads,
        partition_size: plan.partition_size,
        num_partitions: plan.num_partitions,
        scale: args.scale,
    };
    let cfg = Launch {
        grid,
        threads: FKV_DECODE_THREADS,
        shared: plan.shared_bytes,
    };
    at.launch("fkv_paged_attention_decode", cfg, &p)?;
    if plan.num_partitions > 1 {
        let merge = Launch {
            grid: (args.num_q_heads as u32, grid.1, 1),
            threads: kv.head_dim as u32,
            shared: 0,
        };
        at.launch("fkv_paged_attention_decode_merge", merge, &p)?;
    }
    Ok(plan)
}
