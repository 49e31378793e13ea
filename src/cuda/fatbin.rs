//! The fatbin embedded at build time, and a reader of its container format so `foresightkv info`
//! reports the architectures actually present rather than a constant.

use super::CudaError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/foresightkv.fatbin"));

/// Magic number opening a fatbin container.
const FATBIN_MAGIC: u32 = 0xBA55_ED50;

/// The embedded fatbin, or `KernelsNotCompiled` when the build had no nvcc.
pub fn embedded_fatbin() -> Result<&'static [u8], CudaError> {
    if FATBIN.is_empty() {
        Err(CudaError::KernelsNotCompiled)
    } else {
        Ok(FATBIN)
    }
}

/// What an entry of a fatbin holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatbinKind {
    /// PTX for just-in-time compilation on newer GPUs.
    Ptx,
    /// A cubin (ELF) for one real architecture.
    Cubin,
}

/// One image inside a fatbin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FatbinEntry {
    /// PTX or cubin.
    pub kind: FatbinKind,
    /// Architecture number, e.g. 80 for sm_80 / compute_80.
    pub arch: u32,
    /// Payload bytes (possibly compressed).
    pub size: u64,
}

impl std::fmt::Display for FatbinEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            FatbinKind::Cubin => write!(f, "sm_{}", self.arch),
            FatbinKind::Ptx => write!(f, "compute_{} (PTX)", self.arch),
        }
    }
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Lists the images in a fatbin container (one or more concatenated containers).
///
/// Container header: magic u32, version u16, header size u16, body size u64. Each entry header:
/// kind u16 (1 PTX, 2 ELF), version u16, header size u32, payload size u64, ..., arch u32 at 28.
pub fn parse_fatbin(bytes: &[u8]) -> Result<Vec<FatbinEntry>, CudaError> {
    let bad = |what: &str| CudaError::Fatbin(what.to_string());
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let magic = read_u32(bytes, pos).ok_or_else(|| bad("truncated container header"))?;
        if magic != FATBIN_MAGIC {
            if entries.is_empty() {
                return Err(bad(&format!("bad magic {magic:#x}")));
            }
            break; // trailing padding after the last container
        }
        let header = read_u16(bytes, pos + 6).ok_or_else(|| bad("truncated header"))? as usize;
        if header < 16 {
            return Err(bad(&format!(
                "container header of {header} bytes (at least 16)"
            )));
        }
        let body = read_u64(bytes, pos + 8).ok_or_else(|| bad("truncated header"))? as usize;
        let start = pos + header;
        let end = start
            .checked_add(body)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| bad("body past end"))?;
        let mut e = start;
        while e + 32 <= end {
            let kind = read_u16(bytes, e).ok_or_else(|| bad("truncated entry"))?;
            let eheader = read_u32(bytes, e + 4).ok_or_else(|| bad("truncated entry"))? as usize;
            let size = read_u64(bytes, e + 8).ok_or_else(|| bad("truncated entry"))?;
            let arch = read_u32(bytes, e + 28).ok_or_else(|| bad("truncated entry"))?;
            let kind = match kind {
                1 => FatbinKind::Ptx,
                2 => FatbinKind::Cubin,
                k => return Err(bad(&format!("unknown entry kind {k}"))),
            };
            if eheader < 32 {
                return Err(bad(&format!(
                    "entry header of {eheader} bytes (at least 32)"
                )));
            }
            entries.push(FatbinEntry { kind, arch, size });
            e = e
                .checked_add(eheader)
                .and_then(|x| x.checked_add(size as usize))
                .ok_or_else(|| bad("entry size overflows"))?;
        }
        pos = end;
    }
    Ok(entries)
}

/// The images of the embedded fatbin.
pub fn embedded_entries() -> Result<Vec<FatbinEntry>, CudaError> {
    parse_fatbin(embedded_fatbin()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_fatbin(&[1, 2, 3, 4, 5, 6, 7, 8]),
            Err(CudaError::Fatbin(_))
        ));
        assert!(parse_fatbin(&[]).unwrap().is_empty());
        // A container whose header claims 0 bytes must not loop forever.
        let mut header_zero = FATBIN_MAGIC.to_le_bytes().to_vec();
        header_zero.extend_from_slice(&[0u8; 12]);
        assert!(matches!(
            parse_fatbin(&header_zero),
            Err(CudaError::Fatbin(_))
        ));
        // An entry whose header is shorter than the fields read from it.
        let mut short_entry = FATBIN_MAGIC.to_le_bytes().to_vec();
        short_entry.extend_from_slice(&[1, 0, 16, 0]);
        short_entry.extend_from_slice(&32u64.to_le_bytes());
        let mut entry = vec![0u8; 32];
        entry[0] = 2;
        entry[4] = 8;
        short_entry.extend_from_slice(&entry);
        assert!(matches!(
            parse_fatbin(&short_entry),
            Err(CudaError::Fatbin(_))
        ));
    }

    #[test]
    #[cfg_attr(
        not(fkv_kernels),
        ignore = "this build has no CUDA kernels (nvcc was not found at build time)"
    )]
    fn embedded_fatbin_lists_sm80_sm90_and_ptx() {
        let entries = embedded_entries().expect("embedded fatbin parses");
        let names: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        for want in ["sm_80", "sm_90", "compute_90 (PTX)"] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }

    #[test]
    #[cfg(not(fkv_kernels))]
    fn without_nvcc_the_fatbin_is_a_typed_error() {
        assert!(matches!(
            embedded_entries(),
            Err(CudaError::KernelsNotCompiled)
        ));
    }
}
