//! Official-layout checkpoints: input = 2-byte length of a Hugging Face config.json, the JSON, then
//! one safetensors shard. The model shape parser, the shard reader and the converter accept or fail
//! typed, and a converted checkpoint survives the export / re-import round trip.
#![no_main]
use foresightkv::evict::convert::{
    convert_official, export_official, model_shape_from_hf_json, OfficialTensors,
};
use foresightkv::evict::tensors::serialize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (json, shard) = data[2..].split_at(n);
    let Ok(shape) = model_shape_from_hf_json(json, "fuzz config.json") else {
        return;
    };
    let mut official = OfficialTensors::default();
    if official.add_shard("fuzz shard", shard).is_err() {
        return;
    }
    for (budget, interval) in [(16, 8), (8, 16)] {
        if let Ok(ck) = convert_official(&official, shape, budget, interval) {
            let bytes = serialize(&export_official(&ck), "fuzz").expect("export serialises");
            let mut again = OfficialTensors::default();
            again
                .add_shard("re-import", &bytes)
                .expect("export re-imports");
            let back = convert_official(&again, shape, budget, interval).expect("re-converts");
            assert_eq!(back, ck);
        }
    }
});
