//! The ForesightKV policy: the learned per-(layer, KV head) MLP of a scorer checkpoint, run through
//! the kernels' `scorer_mlp` CPU reference, with the paper's top-2L-then-sample victim choice.

use super::checkpoint::ScorerCheckpoint;
use super::policy::{check_scores, EvictionPolicy};
use super::select::VictimMode;
use super::view::EvictionView;
use super::EvictError;
use crate::kernels::{scorer_mlp, DenseRows, StatsMode};
use std::sync::Arc;

/// ForesightKV: scores = the checkpoint's MLP output (eviction propensity) on `concat(k, v, stats)`.
#[derive(Debug, Clone)]
pub struct ForesightPolicy {
    /// The scorer weights and the shape they were trained for.
    pub checkpoint: Arc<ScorerCheckpoint>,
    /// Victim choice: [`VictimMode::Sample`] as in the paper, or [`VictimMode::TopL`].
    pub mode: VictimMode,
}

impl ForesightPolicy {
    /// A policy over `checkpoint` with victim mode `mode`.
    pub fn new(checkpoint: Arc<ScorerCheckpoint>, mode: VictimMode) -> Self {
        Self { checkpoint, mode }
    }
}

impl EvictionPolicy for ForesightPolicy {
    fn name(&self) -> String {
        match self.mode {
            VictimMode::TopL => "foresight-top".into(),
            VictimMode::Sample { .. } => "foresight".into(),
        }
    }

    fn victim_mode(&self) -> VictimMode {
        self.mode
    }

    fn stats_mode(&self) -> Option<StatsMode> {
        Some(self.checkpoint.config.stats_mode)
    }

    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        view.validate()?;
        let c = &self.checkpoint.config;
        let (layer, head) = (view.key.layer as usize, view.key.head as usize);
        let mut bad = Vec::new();
        if layer >= c.num_layers {
            bad.push(format!(
                "layer {layer} but the checkpoint has {} layers",
                c.num_layers
            ));
        }
        if head >= c.num_kv_heads {
            bad.push(format!(
                "KV head {head} but the checkpoint has {} KV heads",
                c.num_kv_heads
            ));
        }
        if view.head_dim != c.head_dim {
            bad.push(format!(
                "head_dim: checkpoint {}, view {}",
                c.head_dim, view.head_dim
            ));
        }
        if view.group_size != c.group_size {
            bad.push(format!(
                "group_size: checkpoint {}, view {}",
                c.group_size, view.group_size
            ));
        }
        if !bad.is_empty() {
            return Err(EvictError::CheckpointMismatch(bad));
        }
        let n = view.live();
        if n == 0 {
            return Ok(());
        }
        let rows = DenseRows::new(n, c.head_dim, c.group_size);
        let weights = self.checkpoint.layers[layer].head(head, c.in_dim());
        scorer_mlp::<f32>(
            &rows.kv,
            &rows.windows(),
            view.keys,
            view.values,
            &rows.stats,
            view.stats,
            &weights,
            n as i64,
            &mut scores[..n],
        )?;
        Ok(())
    }
}
