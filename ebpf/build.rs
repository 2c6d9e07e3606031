//! Compiles `src/*.bpf.c` with clang into `$OUT_DIR/*.bpf.o` (embedded by `src/lib.rs`).
//! Needs clang and the libbpf headers: `apt-get install -y clang libbpf-dev`.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL: &str = "install clang and libbpf-dev: apt-get install -y clang libbpf-dev";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => panic!("zmesh-ebpf: unsupported host architecture {other}"),
    };
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    println!("cargo:rerun-if-changed=src/zmesh_redirect.h");
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!("zmesh-ebpf: /usr/include/bpf/bpf_helpers.h is missing; {INSTALL}");
    }
    const PROGRAMS: &[&str] = &["zmesh_redirect"];
    for name in PROGRAMS {
        let src = format!("src/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            .arg(format!("-I/usr/include/{multiarch}"))
            .args(["-c", &src, "-o"])
            .arg(&obj)
            .output()
            .unwrap_or_else(|e| panic!("zmesh-ebpf: cannot run `{clang}` ({e}); {INSTALL}"));
        if !output.status.success() {
            panic!(
                "zmesh-ebpf: clang failed on {src} (if headers are missing: {INSTALL}):\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
