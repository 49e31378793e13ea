//! Build script: compiles csrc/*.cu into one fatbin (sm_80, sm_90 cubins + compute_90 PTX) that the
//! crate embeds, and generates the Rust view of the kernel parameter structs in csrc/include/*.h.
//!
//! Without nvcc the crate still builds: the embedded fatbin is empty, a `cargo:warning` says how to get
//! the toolchain, and every CUDA entry point returns `Error::KernelsNotCompiled` at run time.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Architectures the fatbin carries: (virtual arch, real code) pairs passed to `-gencode`.
const GENCODE: &[(&str, &str)] = &[
    ("compute_80", "sm_80"),
    ("compute_90", "sm_90"),
    ("compute_90", "compute_90"),
];

const SETUP_HINT: &str =
    "run `eval \"$(scripts/setup.sh)\"` (installs nvcc 13.0 from Python packages \
into ~/.cache/foresightkv) or set NVCC / CUDA_HOME";

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let csrc = manifest.join("csrc");
    let include = csrc.join("include");

    for var in [
        "NVCC",
        "CUDA_HOME",
        "PATH",
        "LIBCLANG_PATH",
        "FORESIGHTKV_NVCC_FLAGS",
        "FORESIGHTKV_CACHE",
        "XDG_CACHE_HOME",
        "HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed={}", csrc.display());
    println!("cargo:rustc-check-cfg=cfg(fkv_kernels)");

    let headers = sorted_files(&include, "h");
    let sources = sorted_files(&csrc, "cu");
    for f in headers.iter().chain(sources.iter()) {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    generate_bindings(&include, &headers, &out.join("params.rs"));

    let fatbin = out.join("foresightkv.fatbin");
    match find_nvcc() {
        Some(nvcc) => {
            compile_fatbin(&nvcc, &include, &sources, &out, &fatbin);
            println!("cargo:rustc-cfg=fkv_kernels");
        }
        None => {
            println!("cargo:warning=foresightkv: nvcc not found, building without CUDA kernels; {SETUP_HINT}");
            fs::write(&fatbin, []).expect("write empty fatbin placeholder");
        }
    }
}

/// Files in `dir` with extension `ext`, sorted so the build is deterministic.
fn sorted_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

/// nvcc from `NVCC`, then `CUDA_HOME/bin`, then `PATH`.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
        println!(
            "cargo:warning=foresightkv: NVCC={} is not a file; looking further",
            p.display()
        );
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

/// Compiles every csrc/*.cu (as one translation unit) into a single fatbin image.
fn compile_fatbin(nvcc: &Path, include: &Path, sources: &[PathBuf], out: &Path, fatbin: &Path) {
    let mut gencode: Vec<String> = Vec::new();
    for (arch, code) in GENCODE {
        gencode.push("-gencode".into());
        gencode.push(format!("arch={arch},code={code}"));
    }
    let extra: Vec<String> = env::var("FORESIGHTKV_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    // One translation unit that includes every kernel file: a single fatbin, no device linking.
    let unity = out.join("foresightkv_all.cu");
    let body: String = sources
        .iter()
        .map(|s| format!("#include \"{}\"\n", s.display()))
        .collect();
    fs::write(&unity, body).expect("write unity source");
    let status = Command::new(nvcc)
        .arg("--fatbin")
        .args(&gencode)
        .args(["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"])
        .arg(format!("-I{}", include.display()))
        .args(&extra)
        .arg("-o")
        .arg(fatbin)
        .arg(&unity)
        .status()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed ({status}) compiling {}", unity.display());
    }
}

/// The cache scripts/setup.sh installs into (same rule as the script).
fn setup_cache() -> Option<PathBuf> {
    if let Some(c) = env::var_os("FORESIGHTKV_CACHE") {
        return Some(PathBuf::from(c));
    }
    env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("foresightkv"))
}

/// Points clang-sys at a libclang: `LIBCLANG_PATH` if set, else the one scripts/setup.sh installed,
/// else the system's; stops the build with the way to get one if there is none.
fn locate_libclang() {
    let has_lib = |dir: &Path| {
        fs::read_dir(dir).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok()).any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("libclang") && n.contains(".so") && !n.starts_with("libclang-cpp")
            })
        })
    };
    if let Some(p) = env::var_os("LIBCLANG_PATH") {
        if has_lib(Path::new(&p)) {
            return;
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(cache) = setup_cache() {
        candidates.push(cache.join("libclang-18").join("clang").join("native"));
    }
    candidates.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    candidates.push(PathBuf::from("/usr/lib/aarch64-linux-gnu"));
    if let Ok(rd) = fs::read_dir("/usr/lib") {
        let mut llvm: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("llvm-"))
            })
            .map(|p| p.join("lib"))
            .collect();
        llvm.sort();
        candidates.extend(llvm.into_iter().rev());
    }
    match candidates.into_iter().find(|d| has_lib(d)) {
        // SAFETY: build scripts are single-threaded; clang-sys reads this variable below.
        Some(dir) => unsafe { env::set_var("LIBCLANG_PATH", dir) },
        None => panic!("libclang not found (bindgen needs it for csrc/include/*.h); {SETUP_HINT}"),
    }
}

/// Runs bindgen over the shared parameter headers so C++ and Rust use one definition.
fn generate_bindings(include: &Path, headers: &[PathBuf], dest: &Path) {
    locate_libclang();
    let mut builder = bindgen::Builder::default()
        .clang_arg(format!("-I{}", include.display()))
        .clang_arg("-xc")
        .allowlist_type("fkv_.*")
        .allowlist_var("FKV_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .use_core();
    for h in headers {
        builder = builder.header(h.to_string_lossy());
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!(
            "bindgen failed on csrc/include ({e}); it needs libclang: {SETUP_HINT} (sets LIBCLANG_PATH)"
        )
    });
    bindings.write_to_file(dest).expect("write params.rs");
}
