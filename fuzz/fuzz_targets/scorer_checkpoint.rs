//! Native scorer checkpoints (config.json + scorer.safetensors): input = 2-byte little-endian length
//! of the JSON, the JSON, then the safetensors bytes. Loads or fails typed; what loads round-trips.
#![no_main]
use foresightkv::evict::ScorerCheckpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (json, weights) = data[2..].split_at(n);
    if let Ok(ck) = ScorerCheckpoint::from_bytes(json, weights, "fuzz") {
        assert!(ck.config.interval <= ck.config.budget);
        let (j, w) = ck.to_bytes().expect("a loaded checkpoint serialises");
        let again = ScorerCheckpoint::from_bytes(&j, &w, "round trip").expect("round trip loads");
        assert_eq!(again, ck);
    }
});
