//! `sample_survivors`: ForesightKV's reproducible victim sampling per (sequence, KV head), as sorted
//! survivor lists, bit for bit the same on the host and on the device.

use super::{Buf, OpError, Place, Windows};
use crate::cuda::{launch_sample_survivors, DeviceSample};
use crate::kernels::{self, SampleArgs};

/// Writes `survivors` (int32 `[num_seqs, num_kv_heads, max_live]`), contract of
/// [`kernels::sample_survivors()`]; `scores` f32 of the same shape, `num_evict` int32 `[num_seqs]`
/// with its host copy, `requests` and `evictions` u32 `[num_seqs]` (the sampling key of each
/// sequence). Only the windows' lengths are read (block tables may be empty).
///
/// # Safety
/// As the [module contract](super).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sample_survivors(
    place: Place,
    windows: &Windows<'_>,
    args: &SampleArgs,
    scores: Buf,
    num_evict: Buf,
    num_evict_host: &[i32],
    requests: Buf,
    evictions: Buf,
    survivors: Buf,
) -> Result<(), OpError> {
    match place {
        Place::Host => Ok(kernels::sample_survivors(
            windows.seq_lens_host,
            windows.live_starts_host,
            args,
            scores.host(),
            num_evict_host,
            requests.host(),
            evictions.host(),
            survivors.host_mut(),
        )?),
        Place::Cuda { ordinal, stream } => {
            let batch = DeviceSample {
                args: args.select,
                scores: scores.device(),
                num_evict: num_evict.device(),
                num_evict_host,
                requests: requests.device(),
                evictions: evictions.device(),
                layer: args.layer,
                seed: args.seed,
                temperature: args.temperature,
            };
            Ok(launch_sample_survivors(
                ordinal,
                stream,
                &windows.on_device(),
                &batch,
                survivors.device(),
            )?)
        }
    }
}
