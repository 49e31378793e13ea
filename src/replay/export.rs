//! Export of a run's block-manager operation sequence as CSV (`op,seq,arg`), so that other block
//! managers (vLLM's KVCacheManager, ours through the Python bindings) can replay the same sequence.

use super::error::ReplayError;
use super::scheduler::{BlockOp, Observer};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes every operation it observes: `add,SEQ,PROMPT_TOKENS`, `append,SEQ,TOKENS`,
/// `compact,SEQ,NEW_LIVE_START`, `free,SEQ,` and `preempt,SEQ,`.
pub struct OpExporter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl OpExporter {
    /// Creates the file and writes the header.
    pub fn create(path: &Path) -> Result<OpExporter, ReplayError> {
        let file = File::create(path).map_err(|source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut e = OpExporter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        };
        e.write(format_args!("op,seq,arg\n"))?;
        Ok(e)
    }

    fn write(&mut self, line: std::fmt::Arguments<'_>) -> Result<(), ReplayError> {
        self.out.write_fmt(line).map_err(|source| ReplayError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Flushes the file.
    pub fn finish(mut self) -> Result<(), ReplayError> {
        self.out.flush().map_err(|source| ReplayError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl Observer for OpExporter {
    fn op(&mut self, op: &BlockOp) -> Result<(), ReplayError> {
        match *op {
            BlockOp::Add { seq, tokens } => self.write(format_args!("add,{seq},{tokens}\n")),
            BlockOp::Append { seq, tokens } => self.write(format_args!("append,{seq},{tokens}\n")),
            BlockOp::Compact { seq, live_start } => {
                self.write(format_args!("compact,{seq},{live_start}\n"))
            }
            BlockOp::Free { seq } => self.write(format_args!("free,{seq},\n")),
            BlockOp::Preempt { seq } => self.write(format_args!("preempt,{seq},\n")),
        }
    }
}
