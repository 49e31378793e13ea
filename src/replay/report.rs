//! The replay's report: the setup it ran and one [`RunMetrics`] per run, printed as a table and
//! written as JSON.

use super::error::ReplayError;
use super::metrics::RunMetrics;
use super::policy_cost::Policy;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// What was replayed, on what, with which cache.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setup {
    /// Trace name or path.
    pub trace: String,
    /// Scenario name.
    pub scenario: String,
    /// Requests replayed.
    pub requests: usize,
    /// Model preset.
    pub model: String,
    /// GPU preset.
    pub gpu: String,
    /// Memory fraction given to weights and KV.
    pub memory_fraction: f64,
    /// KV memory after the weights, GiB.
    pub kv_gib: f64,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Eviction interval L.
    pub interval: usize,
    /// Whether prompts are protected from eviction.
    pub protect_prompt: bool,
    /// Admission rule.
    pub admission: String,
    /// Whether measured kernel timings replaced the roofline's constants.
    pub measured_timings: bool,
}

/// A whole replay: setup and runs, the full cache first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The setup.
    pub setup: Setup,
    /// One entry per (policy, budget).
    pub runs: Vec<RunMetrics>,
}

impl Report {
    /// Throughput of a run relative to the full cache's (none without a full-cache run).
    pub fn speedup(&self, run: &RunMetrics) -> Option<f64> {
        let full = self.runs.iter().find(|r| r.policy == Policy::Full)?;
        (full.output_tokens_per_s > 0.0).then(|| run.output_tokens_per_s / full.output_tokens_per_s)
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), ReplayError> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The report as a text table with a header describing the setup.
    pub fn table(&self) -> String {
        let s = &self.setup;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "trace {} ({}, {} requests) | {} on {} | KV {:.1} GiB at memory fraction {} = {} blocks of {} | L = {} | admission {}{}{}",
            s.trace,
            s.scenario,
            s.requests,
            s.model,
            s.gpu,
            s.kv_gib,
            s.memory_fraction,
            s.num_blocks,
            s.block_size,
            s.interval,
            s.admission,
            if s.protect_prompt { " | prompts protected" } else { "" },
            if s.measured_timings { " | measured kernel timings" } else { "" },
        );
        let header = [
            "policy",
            "budget",
            "out tok/s",
            "vs full",
            "max conc",
            "preempt",
            "evictions",
            "evict time",
            "TTFT p50",
            "TTFT p99",
            "TPOT p50",
            "TPOT p99",
            "peak KV",
            "leaked",
            "finished",
        ];
        let rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                vec![
                    r.policy.name().to_string(),
                    r.budget.map_or("-".into(), |b| b.to_string()),
                    format!("{:.0}", r.output_tokens_per_s),
                    self.speedup(r).map_or("-".into(), |x| format!("{x:.2}x")),
                    r.max_concurrent.to_string(),
                    r.preemptions.to_string(),
                    r.evictions.to_string(),
                    format!("{:.2}%", 100.0 * r.eviction_time_fraction),
                    format!("{:.2} s", r.ttft_p50_s),
                    format!("{:.2} s", r.ttft_p99_s),
                    format!("{:.1} ms", 1e3 * r.tpot_p50_s),
                    format!("{:.1} ms", 1e3 * r.tpot_p99_s),
                    format!("{:.1} GiB", r.peak_kv_gib),
                    r.blocks_leaked.to_string(),
                    format!("{}/{}", r.finished, r.requests),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == 0 {
                        format!("{c:<w$}", w = widths[i])
                    } else {
                        format!("{c:>w$}", w = widths[i])
                    }
                })
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(header.to_vec()));
        for r in &rows {
            let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
        }
        out
    }
}
