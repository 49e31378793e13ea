//! The `foresightkv` command line: build and device information, trace replay, kernel benchmarks,
//! policy fidelity and checkpoint conversion. Everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    foresightkv::cli::main()
}
