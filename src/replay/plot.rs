//! The replay's PNG: output throughput against budget (the full cache as a flat line) and KV memory
//! over time for every run. Text is drawn with the DejaVu Sans font embedded from the `dejavu`
//! crate, so no system font library is needed.

use super::error::ReplayError;
use super::policy_cost::Policy;
use super::report::Report;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

/// Registers the embedded font under the family plotters asks for by default.
fn ensure_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "embedded DejaVu Sans is not a valid font".to_string())
    })
    .clone()
}

/// Colour of the i-th series.
fn colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    PALETTE[i % PALETTE.len()]
}

/// Draws the report's two charts side by side into a PNG at `path`.
pub fn write_png(report: &Report, path: &Path) -> Result<(), ReplayError> {
    draw(report, path).map_err(|message| ReplayError::Plot {
        path: path.to_path_buf(),
        message,
    })
}

/// The drawing area of one chart.
type Area<'b> = DrawingArea<BitMapBackend<'b>, Shift>;

/// A chart with f64 axes.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A plotters error as the message [`ReplayError::Plot`] carries.
fn msg(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// A captioned chart on `area` over the ranges of `x` and `y`, its mesh drawn with their
/// descriptions and whole-number tick labels.
fn axes<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    (xs, x_desc): (Range<f64>, &str),
    (ys, y_desc): (Range<f64>, &str),
) -> Result<Chart<'a, 'b>, String> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xs, ys)
        .map_err(msg)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(msg)?;
    Ok(chart)
}

/// Draws the series-label box of `chart`.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(msg)
}

fn draw(report: &Report, path: &Path) -> Result<(), String> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(msg)?;
    let (left, right) = root.split_horizontally(700);

    let budgets: Vec<usize> = report.runs.iter().filter_map(|r| r.budget).collect();
    let (bmin, bmax) = match (budgets.iter().min(), budgets.iter().max()) {
        (Some(&a), Some(&b)) if a < b => (a as f64, b as f64),
        (Some(&a), _) => (a as f64 * 0.5, a as f64 * 1.5),
        _ => (0.0, 1.0),
    };
    let ymax = report
        .runs
        .iter()
        .map(|r| r.output_tokens_per_s)
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = axes(
        &left,
        "Output throughput against budget",
        (bmin..bmax, "budget B (tokens)"),
        (0.0..ymax, "output tokens/s"),
    )?;
    let mut policies: Vec<Policy> = report.runs.iter().map(|r| r.policy).collect();
    policies.dedup();
    for (i, policy) in policies.iter().enumerate() {
        let c = colour(i);
        let points: Vec<(f64, f64)> = if *policy == Policy::Full {
            let y = report
                .runs
                .iter()
                .find(|r| r.policy == Policy::Full)
                .map_or(0.0, |r| r.output_tokens_per_s);
            vec![(bmin, y), (bmax, y)]
        } else {
            report
                .runs
                .iter()
                .filter(|r| r.policy == *policy)
                .filter_map(|r| Some((r.budget? as f64, r.output_tokens_per_s)))
                .collect()
        };
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(msg)?
            .label(policy.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut chart)?;

    let tmax = report
        .runs
        .iter()
        .flat_map(|r| r.kv_series.last().map(|p| p.0))
        .fold(1e-3, f64::max);
    let kmax = report
        .runs
        .iter()
        .map(|r| r.pool_kv_gib)
        .fold(1e-3, f64::max)
        * 1.05;
    let mut chart = axes(
        &right,
        "KV memory over time",
        (0.0..tmax, "simulated time (s)"),
        (0.0..kmax, "KV held (GiB)"),
    )?;
    for (i, run) in report.runs.iter().enumerate() {
        let c = colour(i);
        let label = match run.budget {
            Some(b) => format!("{} B={b}", run.policy.name()),
            None => run.policy.name().to_string(),
        };
        chart
            .draw_series(LineSeries::new(
                run.kv_series.iter().copied(),
                c.stroke_width(1),
            ))
            .map_err(msg)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut chart)?;
    root.present().map_err(msg)?;
    Ok(())
}
