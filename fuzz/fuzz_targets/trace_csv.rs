//! Replay trace CSV (`foresightkv replay --trace FILE`): any bytes parse or fail with a typed error,
//! and an accepted trace respects the per-request and per-trace bounds.
#![no_main]
use foresightkv::replay::request_trace::{MAX_REQUEST_TOKENS, MAX_TRACE_OUTPUT_TOKENS};
use foresightkv::replay::Trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Trace::from_reader("fuzz", data) {
        let mut total = 0u64;
        let mut last = 0.0f64;
        for r in &t.requests {
            assert!(r.prompt_tokens >= 1 && r.prompt_tokens <= MAX_REQUEST_TOKENS);
            assert!(r.output_tokens >= 1 && r.output_tokens <= MAX_REQUEST_TOKENS);
            assert!(r.arrival_s.is_finite() && r.arrival_s >= last);
            last = r.arrival_s;
            total += u64::from(r.output_tokens);
        }
        assert!(total <= MAX_TRACE_OUTPUT_TOKENS);
        let _ = t.rate();
    }
});
