//! `foresightkv replay`: the replay of [`crate::replay`] with progress bars, its table on stdout, and
//! the JSON report and PNG plot when asked.

use crate::replay::{plot, replay, ReplayArgs, ReplayError, RunProgress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::sync::Mutex;

/// One progress bar per run, on stderr (hidden with `--quiet`).
struct Bars {
    multi: MultiProgress,
    style: ProgressStyle,
    bars: Mutex<HashMap<usize, ProgressBar>>,
}

impl Bars {
    fn new(quiet: bool) -> Result<Self, ReplayError> {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let style =
            ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} requests {elapsed}")
                .map_err(|e| ReplayError::Config(e.to_string()))?
                .progress_chars("=> ");
        Ok(Self {
            multi: MultiProgress::with_draw_target(target),
            style,
            bars: Mutex::new(HashMap::new()),
        })
    }

    fn bar(&self, run: usize) -> Option<ProgressBar> {
        self.bars.lock().ok()?.get(&run).cloned()
    }
}

impl RunProgress for Bars {
    fn started(&self, run: usize, label: &str, total: usize) {
        let bar = self.multi.add(ProgressBar::new(total as u64));
        bar.set_style(self.style.clone());
        bar.set_prefix(label.to_string());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(run, bar);
        }
    }

    fn advanced(&self, run: usize, done: usize) {
        if let Some(bar) = self.bar(run) {
            bar.set_position(done as u64);
        }
    }

    fn finished(&self, run: usize) {
        if let Some(bar) = self.bar(run) {
            bar.finish();
        }
    }
}

/// Runs `foresightkv replay`: prints the table, writes the JSON and the PNG when asked.
pub fn run(args: &ReplayArgs) -> Result<(), ReplayError> {
    let report = replay(args, &Bars::new(args.quiet)?)?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        plot::write_png(&report, path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    #[test]
    fn the_command_line_defaults_are_the_library_defaults() {
        assert_eq!(Cli::parse_from(["replay"]).args, ReplayArgs::default());
        let a = Cli::parse_from(["replay", "--budgets", "512,1024", "--policy", "h2o,tova"]).args;
        assert_eq!(a.budgets, vec![512, 1024]);
        assert_eq!(
            a.policy,
            vec![crate::replay::Policy::H2o, crate::replay::Policy::Tova]
        );
    }
}
