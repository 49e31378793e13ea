//! The one rule for sizes that come from outside (files, command lines, Python arguments): the
//! memory they ask for is computed with checked arithmetic and bounded against what this machine
//! could hold *before* anything is allocated, and allocations are fallible, so a hostile size is a
//! typed error instead of Rust's allocation-failure abort.
//!
//! The bound is the machine's physical memory (`MemTotal` of `/proc/meminfo`; 1 TiB where that is
//! unreadable), capped at `isize::MAX`; `FORESIGHTKV_MAX_ALLOC_BYTES` lowers it (tests, sandboxes).

use std::sync::OnceLock;
use thiserror::Error;

/// Fallback bound where the physical memory cannot be read: 1 TiB.
const FALLBACK_BYTES: u64 = 1 << 40;

/// Environment variable that lowers the bound (bytes).
pub const MAX_ALLOC_ENV: &str = "FORESIGHTKV_MAX_ALLOC_BYTES";

/// A size from outside that cannot be held.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitError {
    /// The product of the sizes overflows 128-bit arithmetic or exceeds the machine's memory.
    #[error("{what} needs {} bytes, more than this machine's {limit} bytes of memory", display_bytes(*.bytes))]
    TooLarge {
        /// What the size is for (names the field or argument).
        what: String,
        /// Bytes asked for (`None`: the product overflowed).
        bytes: Option<u128>,
        /// The bound.
        limit: u64,
    },
    /// The allocator refused a size within the bound.
    #[error("{what}: could not allocate {bytes} bytes")]
    AllocFailed {
        /// What the allocation was for.
        what: String,
        /// Bytes asked for.
        bytes: u128,
    },
}

fn display_bytes(bytes: Option<u128>) -> String {
    match bytes {
        Some(b) => b.to_string(),
        None => "more than 2^128".into(),
    }
}

/// Bytes of physical memory of this machine, read once (see the module docs).
pub fn machine_bytes() -> u64 {
    static BYTES: OnceLock<u64> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kib| kib.parse::<u64>().ok())
                    .map(|kib| kib.saturating_mul(1024))
            })
            .unwrap_or(FALLBACK_BYTES);
        let env = std::env::var(MAX_ALLOC_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        total
            .min(env.unwrap_or(u64::MAX))
            .min(isize::MAX as u64)
            .max(1)
    })
}

/// Requires `count` items of `item_bytes` each to fit the machine; returns the bytes.
pub fn check_bytes(what: &str, count: u128, item_bytes: usize) -> Result<usize, LimitError> {
    let limit = machine_bytes();
    let bytes = count.checked_mul(item_bytes as u128);
    match bytes {
        Some(b) if b <= limit as u128 => Ok(b as usize),
        _ => Err(LimitError::TooLarge {
            what: what.to_string(),
            bytes,
            limit,
        }),
    }
}

/// The product of `dims` (element count), checked, with `item_bytes` per element bounded against
/// the machine (see [`check_bytes`]).
pub fn check_elems(what: &str, dims: &[usize], item_bytes: usize) -> Result<usize, LimitError> {
    let limit = machine_bytes();
    let mut count: u128 = 1;
    for &d in dims {
        count = match count.checked_mul(d as u128) {
            Some(c) if c <= u64::MAX as u128 => c,
            _ => {
                return Err(LimitError::TooLarge {
                    what: what.to_string(),
                    bytes: None,
                    limit,
                })
            }
        };
    }
    check_bytes(what, count, item_bytes.max(1))?;
    Ok(count as usize)
}

/// An empty vector with room for `n` items, bounded and allocated fallibly.
pub fn try_vec<T>(what: &str, n: usize) -> Result<Vec<T>, LimitError> {
    let bytes = check_bytes(what, n as u128, std::mem::size_of::<T>())?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| LimitError::AllocFailed {
            what: what.to_string(),
            bytes: bytes as u128,
        })?;
    Ok(v)
}

/// A vector of `n` copies of `value`, bounded and allocated fallibly.
pub fn try_filled<T: Clone>(what: &str, n: usize, value: T) -> Result<Vec<T>, LimitError> {
    let mut v = try_vec(what, n)?;
    v.resize(n, value);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_products_before_allocating() {
        assert_eq!(check_elems("x", &[3, 4], 4), Ok(12));
        assert!(check_elems("x", &[usize::MAX, usize::MAX, 2], 1).is_err());
        assert!(check_elems("x", &[1 << 40, 1 << 30], 4).is_err());
        let err = try_vec::<f32>("layers", usize::MAX / 2).unwrap_err();
        assert!(err.to_string().contains("layers"), "{err}");
        assert_eq!(try_filled("ok", 5, 1u8).unwrap(), vec![1u8; 5]);
        assert!(machine_bytes() >= 1);
    }
}
