//! CPU reference of `paged_attention_decode`: one new query per sequence attends to its live window
//! of the paged cache (GQA, f32 accumulation).

use super::paged::{check_strides, fits, group_size, LiveWindows, PagedKvLayout};
use super::KernelError;
use crate::Element;
use serde::{Deserialize, Serialize};

/// Query/output shape and strides of a decode call.
///
/// Queries and outputs are `[num_seqs, num_q_heads, head_dim]` with (seq, head) element strides,
/// head_dim contiguous; query head `h` reads KV head `h / (num_q_heads / num_kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodeArgs {
    /// Query heads (a multiple of the KV heads).
    pub num_q_heads: i64,
    /// (seq, head) strides of the query.
    pub query_strides: [i64; 2],
    /// (seq, head) strides of the output.
    pub out_strides: [i64; 2],
    /// Softmax scale applied to q.k (usually 1/sqrt(head_dim)).
    pub scale: f32,
}

impl DecodeArgs {
    /// Densely packed queries and outputs, scale 1/sqrt(head_dim).
    pub fn contiguous(num_q_heads: i64, head_dim: i64) -> Self {
        let s = [num_q_heads * head_dim, head_dim];
        Self {
            num_q_heads,
            query_strides: s,
            out_strides: s,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Checks the arguments against the cache layout and buffer lengths; returns the group size.
    pub fn validate(
        &self,
        kv: &PagedKvLayout,
        num_seqs: usize,
        query_len: usize,
        out_len: usize,
    ) -> Result<i64, KernelError> {
        let g = group_size(self.num_q_heads, kv.num_kv_heads)?;
        if !self.scale.is_finite() {
            return Err(KernelError::InvalidArgument {
                name: "scale",
                why: format!("{} is not finite", self.scale),
            });
        }
        let dims = [num_seqs as i64, self.num_q_heads];
        check_strides("query", &self.query_strides, &dims, kv.head_dim)?;
        check_strides("out", &self.out_strides, &dims, kv.head_dim)?;
        let aliased = (self.out_strides[0] == 0 && num_seqs > 1)
            || (self.out_strides[1] == 0 && self.num_q_heads > 1);
        if aliased {
            return Err(KernelError::InvalidStride {
                name: "out",
                value: 0,
                why: "output rows would alias",
            });
        }
        fits(
            "query",
            query_len,
            super::paged::extent(&self.query_strides, &dims, kv.head_dim),
        )?;
        fits(
            "out",
            out_len,
            super::paged::extent(&self.out_strides, &dims, kv.head_dim),
        )?;
        Ok(g)
    }
}

/// Attention of each sequence's query (all query heads) over its live window.
///
/// `out[s, h] = sum_i softmax_i(scale * q[s, h] . k_i) v_i` over live slots `i` of sequence `s`
/// and KV head `h / G`, computed in f32 and stored as `T`. A sequence with an empty live window
/// gets zeros. Same contract as `fkv_paged_attention_decode` (csrc/paged_attention_decode.cu);
/// everything is validated before any write.
pub fn paged_attention_decode<T: Element>(
    kv: &PagedKvLayout,
    windows: &LiveWindows<'_>,
    args: &DecodeArgs,
    query: &[T],
    key_cache: &[T],
    value_cache: &[T],
    out: &mut [T],
) -> Result<(), KernelError> {
    kv.validate(key_cache.len(), value_cache.len())?;
    windows.validate(kv.block_size, kv.num_blocks)?;
    let g = args.validate(kv, windows.num_seqs(), query.len(), out.len())? as usize;
    let hd = kv.head_dim as usize;
    let mut logits = Vec::new();
    let mut acc = vec![0f32; hd];
    for s in 0..windows.num_seqs() {
        let live = windows.live_len(s);
        for h in 0..args.num_q_heads as usize {
            let kvh = (h / g) as i64;
            let q0 = s * args.query_strides[0] as usize + h * args.query_strides[1] as usize;
            let q: Vec<f32> = query[q0..q0 + hd].iter().map(|x| x.to_f32()).collect();
            logits.clear();
            for i in 0..live {
                let (b, t) = windows.slot(s, i, kv.block_size);
                let k0 = PagedKvLayout::offset(&kv.key_strides, b, t, kvh);
                let dot: f32 = key_cache[k0..k0 + hd]
                    .iter()
                    .zip(&q)
                    .map(|(k, q)| k.to_f32() * q)
                    .sum();
                logits.push(dot * args.scale);
            }
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            acc.iter_mut().for_each(|a| *a = 0.0);
            let mut denom = 0f32;
            for (i, &l) in logits.iter().enumerate() {
                let p = (l - m).exp();
                denom += p;
                let (b, t) = windows.slot(s, i, kv.block_size);
                let v0 = PagedKvLayout::offset(&kv.value_strides, b, t, kvh);
                for (a, v) in acc.iter_mut().zip(&value_cache[v0..v0 + hd]) {
                    *a += p * v.to_f32();
                }
            }
            let o0 = s * args.out_strides[0] as usize + h * args.out_strides[1] as usize;
            let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
            for (o, a) in out[o0..o0 + hd].iter_mut().zip(&acc) {
                *o = T::from_f32(a * inv);
            }
        }
    }
    Ok(())
}
