//! Scenarios: what the replay feeds the scheduler. The trace as recorded; the trace's arrivals and
//! prompts with reasoning-length outputs drawn from a log-normal distribution; and the ForesightKV
//! paper's setting (every request generating the same long output, all arriving at once, so the
//! batch is limited by KV memory alone).

use super::error::ReplayError;
use super::request_trace::{
    Trace, TraceRequest, MAX_REQUEST_TOKENS, MAX_TRACE_OUTPUT_TOKENS, MAX_TRACE_REQUESTS,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Which scenario to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    /// Arrivals, prompt and output lengths as recorded in the trace.
    Recorded,
    /// Arrivals and prompts from the trace, output lengths from the long-output distribution.
    Reasoning,
    /// The paper's setting: fixed prompt and output lengths, all requests at time 0.
    Paper,
}

/// A log-normal output-length distribution, clipped to `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OutputLengths {
    /// Median output length in tokens.
    pub median: f64,
    /// Standard deviation of the log length.
    pub sigma: f64,
    /// Shortest output.
    pub min: u32,
    /// Longest output.
    pub max: u32,
}

impl Default for OutputLengths {
    /// Resembles reasoning traces: median 6K tokens, 90% below about 17K, clipped to 1K..32K.
    fn default() -> Self {
        OutputLengths {
            median: 6000.0,
            sigma: 0.8,
            min: 1000,
            max: 32_768,
        }
    }
}

impl OutputLengths {
    /// Checks that the distribution is well formed.
    pub fn validate(&self) -> Result<(), ReplayError> {
        let ok = self.median >= 1.0
            && self.median.is_finite()
            && self.sigma >= 0.0
            && self.sigma.is_finite();
        if !ok {
            return Err(ReplayError::Config(format!(
                "output median {} / sigma {} out of range",
                self.median, self.sigma
            )));
        }
        if self.min == 0 || self.min > self.max {
            return Err(ReplayError::Config(format!(
                "output range [{}, {}] is empty or starts at 0",
                self.min, self.max
            )));
        }
        if self.max > MAX_REQUEST_TOKENS {
            return Err(ReplayError::Config(format!(
                "longest output {} is more than {MAX_REQUEST_TOKENS} tokens (2^22) per request",
                self.max
            )));
        }
        Ok(())
    }

    /// Draws one length.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> u32 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let len = (self.median.ln() + self.sigma * z).exp().round();
        len.clamp(f64::from(self.min), f64::from(self.max)) as u32
    }
}

/// Everything that defines a scenario's requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioSpec {
    /// Which scenario.
    pub kind: ScenarioKind,
    /// How many requests: the first N of the trace, or N identical ones in the paper setting.
    pub requests: usize,
    /// Arrival-rate multiplier (2 = arrivals twice as dense).
    pub rate_scale: f64,
    /// Output lengths of the reasoning scenario.
    pub output: OutputLengths,
    /// Prompt length in the paper setting.
    pub paper_prompt: u32,
    /// Output length in the paper setting.
    pub paper_output: u32,
    /// Seed of the output-length draws.
    pub seed: u64,
}

impl ScenarioSpec {
    /// Builds the scenario's requests from a trace, sorted by arrival.
    pub fn build(&self, trace: &Trace) -> Result<Vec<TraceRequest>, ReplayError> {
        if self.requests == 0 {
            return Err(ReplayError::Config(
                "a scenario needs at least one request".into(),
            ));
        }
        if self.requests > MAX_TRACE_REQUESTS {
            return Err(ReplayError::Config(format!(
                "{} requests is more than {MAX_TRACE_REQUESTS} (2^24)",
                self.requests
            )));
        }
        if !(self.rate_scale > 0.0 && self.rate_scale.is_finite()) {
            return Err(ReplayError::Config(format!(
                "rate scale {} must be positive",
                self.rate_scale
            )));
        }
        let scale = |r: &TraceRequest| TraceRequest {
            arrival_s: r.arrival_s / self.rate_scale,
            ..*r
        };
        let first = trace.requests.iter().take(self.requests);
        match self.kind {
            ScenarioKind::Recorded => Ok(first.map(scale).collect()),
            ScenarioKind::Reasoning => {
                self.output.validate()?;
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                Ok(first
                    .map(|r| TraceRequest {
                        output_tokens: self.output.sample(&mut rng),
                        ..scale(r)
                    })
                    .collect())
            }
            ScenarioKind::Paper => {
                if self.paper_prompt == 0 || self.paper_output == 0 {
                    return Err(ReplayError::Config(
                        "paper prompt and output lengths must be positive".into(),
                    ));
                }
                let total = self.requests as u64 * u64::from(self.paper_output);
                if self.paper_prompt.max(self.paper_output) > MAX_REQUEST_TOKENS
                    || total > MAX_TRACE_OUTPUT_TOKENS
                {
                    return Err(ReplayError::Config(format!(
                        "paper prompt {} / output {} x {} requests: at most {MAX_REQUEST_TOKENS} \
                         tokens (2^22) per request and {MAX_TRACE_OUTPUT_TOKENS} (2^32) generated in all",
                        self.paper_prompt, self.paper_output, self.requests
                    )));
                }
                let r = TraceRequest {
                    arrival_s: 0.0,
                    prompt_tokens: self.paper_prompt,
                    output_tokens: self.paper_output,
                };
                Ok(vec![r; self.requests])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::request_trace::BundledTrace;
    use proptest::prelude::*;

    fn spec(kind: ScenarioKind) -> ScenarioSpec {
        ScenarioSpec {
            kind,
            requests: 500,
            rate_scale: 2.0,
            output: OutputLengths::default(),
            paper_prompt: 128,
            paper_output: 32_768,
            seed: 7,
        }
    }

    #[test]
    fn reasoning_keeps_arrivals_and_prompts_and_stretches_outputs() {
        let trace = Trace::bundled(BundledTrace::Conversation).unwrap();
        let recorded = spec(ScenarioKind::Recorded).build(&trace).unwrap();
        let reasoning = spec(ScenarioKind::Reasoning).build(&trace).unwrap();
        assert_eq!(recorded.len(), 500);
        for (a, b) in recorded.iter().zip(&reasoning) {
            assert_eq!(a.arrival_s, b.arrival_s);
            assert_eq!(a.prompt_tokens, b.prompt_tokens);
            assert!((1000..=32_768).contains(&b.output_tokens));
        }
        assert_eq!(recorded[1].arrival_s, trace.requests[1].arrival_s / 2.0);
        let mut outs: Vec<u32> = reasoning.iter().map(|r| r.output_tokens).collect();
        outs.sort_unstable();
        let median = outs[outs.len() / 2];
        assert!((4500..=8000).contains(&median), "median {median}");
        assert!(
            outs[outs.len() * 9 / 10] > 10_000,
            "reasoning tail reaches tens of thousands"
        );
        assert_eq!(
            reasoning,
            spec(ScenarioKind::Reasoning).build(&trace).unwrap(),
            "seeded draws repeat"
        );
    }

    #[test]
    fn paper_setting_is_uniform_and_simultaneous() {
        let trace = Trace::bundled(BundledTrace::Code).unwrap();
        let p = spec(ScenarioKind::Paper).build(&trace).unwrap();
        assert_eq!(p.len(), 500);
        assert!(p
            .iter()
            .all(|r| r.arrival_s == 0.0 && r.prompt_tokens == 128 && r.output_tokens == 32_768));
    }

    #[test]
    fn bad_settings_are_errors() {
        let trace = Trace::bundled(BundledTrace::Code).unwrap();
        let mut s = spec(ScenarioKind::Reasoning);
        s.output.min = 0;
        assert!(matches!(s.build(&trace), Err(ReplayError::Config(_))));
        let mut s = spec(ScenarioKind::Recorded);
        s.rate_scale = 0.0;
        assert!(matches!(s.build(&trace), Err(ReplayError::Config(_))));
        s.rate_scale = 1.0;
        s.requests = 0;
        assert!(matches!(s.build(&trace), Err(ReplayError::Config(_))));
    }

    proptest! {
        #[test]
        fn sampled_lengths_stay_in_range(seed in any::<u64>(), median in 1.0f64..50_000.0, sigma in 0.0f64..3.0,
                                         min in 1u32..5000, span in 0u32..40_000) {
            let d = OutputLengths { median, sigma, min, max: min + span };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for _ in 0..64 {
                let v = d.sample(&mut rng);
                prop_assert!(v >= d.min && v <= d.max);
            }
        }
    }
}
