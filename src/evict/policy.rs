//! The one interface every eviction policy implements: per-entry eviction scores over an
//! [`EvictionView`], followed by the shared victim selection.

use super::select::{select_victims, VictimMode, VictimRequest};
use super::view::EvictionView;
use super::EvictError;
use crate::kernels::StatsMode;

/// An eviction policy: scores live entries (higher = evicted first) and names its victim mode.
pub trait EvictionPolicy: Send + Sync {
    /// Short name (as on the command line and in tables).
    fn name(&self) -> String;

    /// Whether the policy evicts at all (false only for the full cache).
    fn evicts(&self) -> bool {
        true
    }

    /// The statistics mode the policy's scores need (`Some` for a scorer trained on one mode;
    /// `None` when any mode will do: every baseline, whose statistics agree in both modes).
    fn stats_mode(&self) -> Option<StatsMode> {
        None
    }

    /// How victims are chosen from the scores.
    fn victim_mode(&self) -> VictimMode {
        VictimMode::TopL
    }

    /// Writes the eviction propensity of every live entry of `view` to `scores[..view.live()]`.
    /// Protected entries get a score too; the selection ignores it.
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError>;
}

/// Scores `view` with `policy` and chooses `num_evict` victims outside the newest `num_protected`
/// slots; returns the victims' slot indices ascending (empty for a policy that does not evict).
pub fn choose_victims(
    policy: &dyn EvictionPolicy,
    view: &EvictionView<'_>,
    num_protected: usize,
    num_evict: usize,
) -> Result<Vec<usize>, EvictError> {
    if !policy.evicts() {
        return Ok(Vec::new());
    }
    view.validate()?;
    let mut scores = vec![0f32; view.live()];
    policy.score(view, &mut scores)?;
    select_victims(
        &scores,
        &VictimRequest {
            num_protected,
            num_evict,
            key: view.key,
        },
        &policy.victim_mode(),
    )
}

/// Checks the view's buffers agree with its shape and the score buffer holds one value per live
/// entry, so no policy indexes past a caller's buffer.
pub(crate) fn check_scores(view: &EvictionView<'_>, scores: &[f32]) -> Result<(), EvictError> {
    view.validate()?;
    if scores.len() < view.live() {
        return Err(EvictError::Shape(format!(
            "{} score slots for {} live entries",
            scores.len(),
            view.live()
        )));
    }
    Ok(())
}
