//! `bench-kernels --json` output read back by `foresightkv replay --timings`: parse or fail typed;
//! accepted figures are positive and finite.
#![no_main]
use foresightkv::replay::MeasuredTimings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = MeasuredTimings::parse(text, std::path::Path::new("fuzz.json")) {
        for d in &t.decode {
            assert!(d.kv_bytes.is_finite() && d.kv_bytes > 0.0);
            assert!(d.time_us.is_none_or(|us| us.is_finite() && us > 0.0));
        }
        for e in &t.evict {
            assert!(e.total_us.is_finite() && e.total_us > 0.0);
        }
    }
});
