//! `paged_attention_decode`: each sequence's query (all heads) over its live window of the cache.

use super::{paged, with_elem, Buf, Cache, OpError, Place, Windows};
use crate::cuda::{launch_paged_attention_decode, plan_decode};
use crate::kernels::{self, DecodeArgs, PagedKvLayout};
use crate::DType;

/// f32 workspace elements a call needs at `place` (0 on the host, and on CUDA when the live windows
/// fit one partition).
pub fn workspace_len(
    place: Place,
    kv: &PagedKvLayout,
    num_q_heads: i64,
    windows: &Windows<'_>,
) -> Result<usize, OpError> {
    match place {
        Place::Host => Ok(0),
        Place::Cuda { .. } => Ok(plan_decode(
            kv,
            num_q_heads,
            windows.seq_lens_host.len(),
            windows.max_live(),
        )?
        .workspace_len),
    }
}

/// Decode attention, contract of [`kernels::paged_attention_decode()`]; `query`, `out` and the
/// cache in `dtype`, `workspace` f32 of at least [`workspace_len`] elements.
///
/// # Safety
/// As the [module contract](super).
#[allow(clippy::too_many_arguments)]
pub unsafe fn paged_attention_decode(
    place: Place,
    dtype: DType,
    kv: &PagedKvLayout,
    cache: Cache,
    windows: &Windows<'_>,
    args: &DecodeArgs,
    query: Buf,
    out: Buf,
    workspace: Buf,
) -> Result<(), OpError> {
    match place {
        Place::Host => with_elem!(dtype, T => Ok(kernels::paged_attention_decode::<T>(
            kv,
            &windows.on_host(),
            args,
            query.host(),
            cache.key.host(),
            cache.value.host(),
            out.host_mut(),
        )?)),
        Place::Cuda { ordinal, stream } => {
            launch_paged_attention_decode(
                &paged((ordinal, stream), dtype, kv, cache, &windows.on_device()),
                args,
                query.device(),
                out.device(),
                workspace.device(),
            )?;
            Ok(())
        }
    }
}
