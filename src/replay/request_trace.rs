//! Request traces: the bundled Azure LLM inference traces 2023 (CC-BY, see
//! data/traces/AzureLLMInferenceDataset2023.md) and any CSV with the same columns
//! (`TIMESTAMP,ContextTokens,GeneratedTokens`), with bad rows reported by line number.

use super::error::ReplayError;
use serde::Serialize;
use std::io::Read;
use std::path::Path;

/// The Azure 2023 conversation trace (19,366 requests), embedded in the binary.
const CONV_CSV: &str = include_str!("../../data/traces/azure_llm_2023_conv.csv");
/// The Azure 2023 code-completion trace (8,819 requests), embedded in the binary.
const CODE_CSV: &str = include_str!("../../data/traces/azure_llm_2023_code.csv");

/// Most tokens one request may have, prompt and output each (2^22 = 4,194,304, beyond any model's
/// context): a row asking for billions of tokens is refused at parse time, not hours into a replay.
pub const MAX_REQUEST_TOKENS: u32 = 1 << 22;
/// Most requests a trace may have (2^24).
pub const MAX_TRACE_REQUESTS: usize = 1 << 24;
/// Most generated tokens a whole trace may ask for (2^32), bounding the replay's running time.
pub const MAX_TRACE_OUTPUT_TOKENS: u64 = 1 << 32;

/// One request of a trace: when it arrives and how many tokens go in and come out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TraceRequest {
    /// Arrival time in seconds after the trace's first request.
    pub arrival_s: f64,
    /// Prompt length in tokens (at least 1).
    pub prompt_tokens: u32,
    /// Generated tokens (at least 1).
    pub output_tokens: u32,
}

/// A trace: requests sorted by arrival, the first arriving at time 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trace {
    /// Where it came from (bundled name or path), for reports.
    pub name: String,
    /// The requests, sorted by arrival.
    pub requests: Vec<TraceRequest>,
}

/// The traces that ship inside the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundledTrace {
    /// Azure 2023 conversation service.
    Conversation,
    /// Azure 2023 code-completion service.
    Code,
}

impl BundledTrace {
    /// Short name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BundledTrace::Conversation => "azure-conv-2023",
            BundledTrace::Code => "azure-code-2023",
        }
    }

    fn csv(self) -> &'static str {
        match self {
            BundledTrace::Conversation => CONV_CSV,
            BundledTrace::Code => CODE_CSV,
        }
    }
}

impl Trace {
    /// Parses a bundled trace.
    pub fn bundled(which: BundledTrace) -> Result<Trace, ReplayError> {
        Trace::from_reader(which.name(), which.csv().as_bytes())
    }

    /// Reads a trace CSV file.
    pub fn from_path(path: &Path) -> Result<Trace, ReplayError> {
        let file = std::fs::File::open(path).map_err(|source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Trace::from_reader(&path.display().to_string(), file)
    }

    /// Parses CSV text with the columns TIMESTAMP (a `YYYY-MM-DD HH:MM:SS[.frac]` time or plain
    /// seconds), ContextTokens and GeneratedTokens, in any order, matched case-insensitively.
    pub fn from_reader<R: Read>(name: &str, reader: R) -> Result<Trace, ReplayError> {
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_reader(reader);
        let headers = csv
            .headers()
            .map_err(|e| ReplayError::BadRow {
                trace: name.into(),
                line: 1,
                message: e.to_string(),
            })?
            .clone();
        let column = |wanted: &'static str| {
            headers
                .iter()
                .position(|h| h.eq_ignore_ascii_case(wanted))
                .ok_or(ReplayError::MissingColumn {
                    trace: name.into(),
                    column: wanted,
                })
        };
        let (ts_col, ctx_col, gen_col) = (
            column("TIMESTAMP")?,
            column("ContextTokens")?,
            column("GeneratedTokens")?,
        );
        let mut raw: Vec<(f64, u32, u32)> = Vec::new();
        let mut total_output: u64 = 0;
        let mut record = csv::StringRecord::new();
        loop {
            let line_hint = csv.position().line();
            let more = csv
                .read_record(&mut record)
                .map_err(|e| ReplayError::BadRow {
                    trace: name.into(),
                    line: e.position().map_or(line_hint, |p| p.line()),
                    message: e.to_string(),
                })?;
            if !more {
                break;
            }
            let line = record.position().map_or(line_hint, |p| p.line());
            let bad = |message: String| ReplayError::BadRow {
                trace: name.into(),
                line,
                message,
            };
            let field =
                |i: usize, what: &str| record.get(i).ok_or_else(|| bad(format!("no {what} field")));
            let ts = field(ts_col, "TIMESTAMP")?;
            let t = parse_timestamp(ts)
                .ok_or_else(|| bad(format!("TIMESTAMP {ts:?} is not a time")))?;
            let count = |i: usize, what: &str| -> Result<u32, ReplayError> {
                let s = field(i, what)?;
                match s.parse::<u32>() {
                    Ok(0) => Err(bad(format!(
                        "{what} is 0; a request needs at least one token"
                    ))),
                    Ok(v) if v > MAX_REQUEST_TOKENS => Err(bad(format!(
                        "{what} {v} is more than {MAX_REQUEST_TOKENS} tokens (2^22) per request"
                    ))),
                    Ok(v) => Ok(v),
                    Err(_) => Err(bad(format!("{what} {s:?} is not a positive integer"))),
                }
            };
            let row = (
                t,
                count(ctx_col, "ContextTokens")?,
                count(gen_col, "GeneratedTokens")?,
            );
            total_output += u64::from(row.2);
            if total_output > MAX_TRACE_OUTPUT_TOKENS {
                return Err(bad(format!(
                    "the trace asks for more than {MAX_TRACE_OUTPUT_TOKENS} generated tokens (2^32) in all"
                )));
            }
            if raw.len() >= MAX_TRACE_REQUESTS {
                return Err(bad(format!(
                    "the trace has more than {MAX_TRACE_REQUESTS} requests (2^24)"
                )));
            }
            if raw.try_reserve(1).is_err() {
                return Err(bad("out of memory holding the trace's rows".into()));
            }
            raw.push(row);
        }
        if raw.is_empty() {
            return Err(ReplayError::EmptyTrace(name.into()));
        }
        raw.sort_by(|a, b| a.0.total_cmp(&b.0));
        let t0 = raw[0].0;
        let requests = raw
            .into_iter()
            .map(|(t, p, o)| TraceRequest {
                arrival_s: t - t0,
                prompt_tokens: p,
                output_tokens: o,
            })
            .collect();
        Ok(Trace {
            name: name.into(),
            requests,
        })
    }

    /// Mean arrival rate in requests per second over the trace's span (0 for a single request).
    pub fn rate(&self) -> f64 {
        let span = self.requests.last().map_or(0.0, |r| r.arrival_s);
        if span > 0.0 {
            (self.requests.len() - 1) as f64 / span
        } else {
            0.0
        }
    }
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fraction]` (also with a `T`) to seconds since 1970, or a plain
/// non-negative number of seconds.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    if let Ok(v) = s.parse::<f64>() {
        return (v.is_finite() && v >= 0.0).then_some(v);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let mut t = time.splitn(3, ':');
    let hour: u32 = t.next()?.parse().ok()?;
    let minute: u32 = t.next()?.parse().ok()?;
    let second: f64 = t.next()?.trim_end_matches('Z').parse().ok()?;
    if !(0..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || !(0.0..61.0).contains(&second)
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days as f64 * 86_400.0 + f64::from(hour * 3600 + minute * 60) + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_traces_parse_whole() {
        let conv = Trace::bundled(BundledTrace::Conversation).unwrap();
        assert_eq!(conv.requests.len(), 19_366);
        let code = Trace::bundled(BundledTrace::Code).unwrap();
        assert_eq!(code.requests.len(), 8_819);
        for t in [&conv, &code] {
            assert_eq!(t.requests[0].arrival_s, 0.0);
            assert!(t
                .requests
                .windows(2)
                .all(|w| w[0].arrival_s <= w[1].arrival_s));
            assert!(t.rate() > 0.1, "{}: rate {}", t.name, t.rate());
        }
    }

    #[test]
    fn timestamps_match_known_epochs() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0.0));
        assert_eq!(parse_timestamp("2000-03-01 00:00:00"), Some(951_868_800.0));
        let a = parse_timestamp("2023-11-16 18:17:03.9799600").unwrap();
        let b = parse_timestamp("2023-11-16 18:17:04.0319600").unwrap();
        assert!((b - a - 0.052).abs() < 1e-6);
        assert_eq!(parse_timestamp("12.5"), Some(12.5));
        assert_eq!(parse_timestamp("2023-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn bad_rows_carry_their_line_number() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10,5\n1.0,abc,5\n";
        match Trace::from_reader("t", text.as_bytes()) {
            Err(ReplayError::BadRow { line, message, .. }) => {
                assert_eq!(line, 3);
                assert!(message.contains("ContextTokens"), "{message}");
            }
            other => panic!("expected a bad row, got {other:?}"),
        }
        let zero = "TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10,5\n1.0,10,5\n2.0,10,0\n";
        assert!(matches!(
            Trace::from_reader("t", zero.as_bytes()),
            Err(ReplayError::BadRow { line: 4, .. })
        ));
        let short = "TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10\n";
        assert!(matches!(
            Trace::from_reader("t", short.as_bytes()),
            Err(ReplayError::BadRow { line: 2, .. })
        ));
        let time = "TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10,5\nnoon,10,5\n";
        assert!(matches!(
            Trace::from_reader("t", time.as_bytes()),
            Err(ReplayError::BadRow { line: 3, .. })
        ));
    }

    #[test]
    fn columns_in_any_order_and_missing_ones() {
        let text = "GeneratedTokens,timestamp,ContextTokens\n7,5.0,3\n9,2.0,4\n";
        let t = Trace::from_reader("t", text.as_bytes()).unwrap();
        assert_eq!(
            t.requests,
            vec![
                TraceRequest {
                    arrival_s: 0.0,
                    prompt_tokens: 4,
                    output_tokens: 9
                },
                TraceRequest {
                    arrival_s: 3.0,
                    prompt_tokens: 3,
                    output_tokens: 7
                },
            ]
        );
        let missing = "TIMESTAMP,ContextTokens\n0,1\n";
        assert!(matches!(
            Trace::from_reader("t", missing.as_bytes()),
            Err(ReplayError::MissingColumn {
                column: "GeneratedTokens",
                ..
            })
        ));
        let empty = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
        assert!(matches!(
            Trace::from_reader("t", empty.as_bytes()),
            Err(ReplayError::EmptyTrace(_))
        ));
    }
}
