//! Unknown configuration keys are errors, never ignored: every configuration struct read from outside
//! is `#[serde(deny_unknown_fields)]`, and [`explain`] turns serde's "unknown field" error into one
//! that names the key and suggests the closest valid one (a typo such as `"evicton"` must not give a
//! silently different configuration).

/// The message of `err`, with "did you mean `x`?" appended when it is an unknown-field error.
pub fn explain(err: &serde_json::Error) -> String {
    let msg = err.to_string();
    match unknown_field(&msg) {
        Some((key, valid)) => match closest(&key, &valid) {
            Some(best) => format!("{msg}; did you mean `{best}`?"),
            None => msg,
        },
        None => msg,
    }
}

/// Whether `err` reports an unknown key.
pub fn is_unknown_field(err: &serde_json::Error) -> bool {
    unknown_field(&err.to_string()).is_some()
}

/// The unknown key and the valid keys of serde's message ("unknown field `k`, expected `a` or `b`" /
/// "expected one of `a`, `b`, ..." / "there are no fields").
fn unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
    let rest = msg.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    let key = rest[..end].to_string();
    let tail = &rest[end + 1..];
    let tail = tail.split(" at line ").next().unwrap_or(tail);
    let valid = tail
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect();
    Some((key, valid))
}

/// The entry of `valid` closest to `key` by edit distance (ties: the first).
pub fn closest<'a>(key: &str, valid: &'a [String]) -> Option<&'a str> {
    valid
        .iter()
        .min_by_key(|v| edit_distance(key, v))
        .map(String::as_str)
}

/// Levenshtein distance between `a` and `b` (characters).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Two {
        budget: usize,
        eviction: Option<usize>,
    }

    #[test]
    fn names_the_key_and_suggests_the_closest() {
        let err = serde_json::from_str::<Two>(r#"{"budget": 1, "evicton": 2}"#).unwrap_err();
        assert!(is_unknown_field(&err));
        let m = explain(&err);
        assert!(
            m.contains("`evicton`") && m.contains("did you mean `eviction`?"),
            "{m}"
        );
        let err = serde_json::from_str::<Two>(r#"{"budget": "x"}"#).unwrap_err();
        assert!(!is_unknown_field(&err));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
