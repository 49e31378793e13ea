//! What an eviction step sees for one (layer, KV head): the live entries' keys, values, statistics
//! and original positions, and the queries since the last eviction.

use super::philox::SampleKey;
use super::EvictError;
use crate::kernels::NUM_STATS;

/// The inputs of one (layer, KV head) eviction decision, all f32, row-major.
///
/// Live slot `i` holds original token `positions[i]` (ascending). `queries` are the group's queries
/// of the last `m` tokens, oldest first: row `j` belongs to logical position `seq_len - m + j`, the
/// token in live slot `n - m + j`, and sees slots `0..=n - m + j` (causal).
#[derive(Debug, Clone, Copy)]
pub struct EvictionView<'a> {
    /// Which decision this is (layer, KV head, eviction index, request); its seed is unused.
    pub key: SampleKey,
    /// Elements per head row.
    pub head_dim: usize,
    /// Query heads per KV head (GQA group size G).
    pub group_size: usize,
    /// Softmax scale of the attention (usually 1/sqrt(head_dim)).
    pub scale: f32,
    /// Logical length of the sequence (tokens ever cached).
    pub seq_len: usize,
    /// `[n, head_dim]` keys of the live entries (RoPE applied).
    pub keys: &'a [f32],
    /// `[n, head_dim]` values of the live entries.
    pub values: &'a [f32],
    /// `[n, G * 8]` statistics, query head major, in the order of `kernels::window_stats`.
    pub stats: &'a [f32],
    /// `[m, G, head_dim]` queries since the last eviction.
    pub queries: &'a [f32],
    /// `[n]` original logical positions of the live entries.
    pub positions: &'a [u32],
}

impl EvictionView<'_> {
    /// Live entries `n`.
    pub fn live(&self) -> usize {
        self.positions.len()
    }

    /// Queries `m` since the last eviction.
    pub fn num_queries(&self) -> usize {
        match self.group_size.checked_mul(self.head_dim) {
            Some(row) if row > 0 => self.queries.len() / row,
            _ => 0,
        }
    }

    /// Checks every buffer against `n`, `m`, `head_dim` and `G`.
    pub fn validate(&self) -> Result<(), EvictError> {
        let (n, d, g) = (self.live(), self.head_dim, self.group_size);
        if d == 0 || g == 0 {
            return Err(EvictError::arg(
                "view",
                format!("head_dim {d} and group_size {g} must be positive"),
            ));
        }
        let m = self.num_queries();
        let checks = [
            ("keys", self.keys.len(), n.saturating_mul(d)),
            ("values", self.values.len(), n.saturating_mul(d)),
            (
                "stats",
                self.stats.len(),
                n.saturating_mul(g).saturating_mul(NUM_STATS),
            ),
            (
                "queries",
                self.queries.len(),
                m.saturating_mul(g).saturating_mul(d),
            ),
        ];
        for (name, have, want) in checks {
            if have != want {
                return Err(EvictError::Shape(format!(
                    "{name} has {have} floats, expected {want}"
                )));
            }
        }
        if m > n {
            return Err(EvictError::Shape(format!(
                "{m} queries but only {n} live entries"
            )));
        }
        if self.seq_len < n {
            return Err(EvictError::Shape(format!(
                "sequence length {} below live count {n}",
                self.seq_len
            )));
        }
        Ok(())
    }

    /// Key row of live slot `i`.
    pub fn key_row(&self, i: usize) -> &[f32] {
        &self.keys[i * self.head_dim..(i + 1) * self.head_dim]
    }

    /// Statistic `stat` of live slot `i` summed over the group's query heads.
    pub fn group_stat(&self, i: usize, stat: usize) -> f32 {
        let row =
            &self.stats[i * self.group_size * NUM_STATS..(i + 1) * self.group_size * NUM_STATS];
        (0..self.group_size)
            .map(|g| row[g * NUM_STATS + stat])
            .sum()
    }

    /// Causal softmax of query row `j`, head `g` of the group over the live slots it sees, written
    /// to `out[..n]` (0 for slots it cannot see).
    pub fn query_probs(&self, j: usize, g: usize, out: &mut [f32]) {
        let (n, d, m) = (self.live(), self.head_dim, self.num_queries());
        let q = &self.queries[(j * self.group_size + g) * d..(j * self.group_size + g + 1) * d];
        let visible = n - m + j + 1;
        softmax_into(
            q,
            &self.keys[..visible * d],
            d,
            self.scale,
            &mut out[..visible],
        );
        out[visible..n].iter_mut().for_each(|x| *x = 0.0);
    }
}

/// `out[i] = softmax_i(scale * q . keys[i])` over the rows of `keys` (`[rows, d]`), in f32 with a
/// max shift.
pub fn softmax_into(q: &[f32], keys: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let mut mx = f32::NEG_INFINITY;
    for (o, k) in out.iter_mut().zip(keys.chunks_exact(d)) {
        *o = crate::kernels::dot(q, k) * scale;
        mx = mx.max(*o);
    }
    let mut denom = 0f32;
    for o in out.iter_mut() {
        *o = (*o - mx).exp();
        denom += *o;
    }
    for o in out.iter_mut() {
        *o /= denom;
    }
}
