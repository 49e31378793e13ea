//! `select_survivors`: the deterministic top-k eviction choice per (sequence, KV head), as sorted
//! survivor lists.

use super::{Buf, OpError, Place, Windows};
use crate::cuda::launch_select_survivors;
use crate::kernels::{self, SelectArgs};

/// Writes `survivors` (int32 `[num_seqs, num_kv_heads, max_live]`), contract of
/// [`kernels::select_survivors()`]; `scores` f32 of the same shape, `num_evict` int32 `[num_seqs]`
/// with its host copy. Only the windows' lengths are read (block tables may be empty).
///
/// # Safety
/// As the [module contract](super).
pub unsafe fn select_survivors(
    place: Place,
    windows: &Windows<'_>,
    args: &SelectArgs,
    scores: Buf,
    num_evict: Buf,
    num_evict_host: &[i32],
    survivors: Buf,
) -> Result<(), OpError> {
    match place {
        Place::Host => Ok(kernels::select_survivors(
            windows.seq_lens_host,
            windows.live_starts_host,
            args,
            scores.host(),
            num_evict_host,
            survivors.host_mut(),
        )?),
        Place::Cuda { ordinal, stream } => Ok(launch_select_survivors(
            ordinal,
            stream,
            &windows.on_device(),
            args,
            scores.device(),
            num_evict.device(),
            num_evict_host,
            survivors.device(),
        )?),
    }
}
