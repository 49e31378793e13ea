//! Cache configuration JSON (`CacheConfig.from_json`, the CLI): unknown keys are refused with a
//! suggestion, an accepted config validates or fails typed, and a valid one round-trips.
#![no_main]
use foresightkv::block::CacheConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match serde_json::from_slice::<CacheConfig>(data) {
        Ok(c) => {
            if c.validate().is_ok() {
                let back: CacheConfig =
                    serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
                assert_eq!(back, c);
            }
        }
        Err(e) => {
            let msg = foresightkv::config_keys::explain(&e);
            if foresightkv::config_keys::is_unknown_field(&e) {
                assert!(msg.contains("unknown field"));
            }
        }
    }
});
