//! Attention traces (safetensors, `Trace.load`, `foresightkv fidelity`): parse or fail typed; every
//! layer of an accepted trace converts to f32 with the shapes it claims.
#![no_main]
use foresightkv::evict::Trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Trace::from_bytes(data.to_vec(), "fuzz") {
        let s = t.shape();
        for l in 0..s.num_layers {
            let layer = t.layer(l).expect("a validated layer converts");
            assert_eq!(layer.queries.len(), s.len * s.num_q_heads * s.head_dim);
            assert_eq!(layer.keys.len(), s.len * s.num_kv_heads * s.head_dim);
            assert_eq!(layer.values.len(), layer.keys.len());
        }
    }
});
