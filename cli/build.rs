//! Embeds the install manifests into the `zmesh` binary, so `manifests/` stays the one source of
//! truth: the files listed in `manifests/kustomization.yaml`'s `resources` (in that order; a
//! listed directory contributes its own kustomization's resources) become
//! `$OUT_DIR/manifests.rs`, a list of `include_str!` entries.
//!
//! `ZMESH_MANIFESTS_DIR` points the build at another directory (tests of the embedding itself).
//! Without a kustomization the binary embeds nothing and `zmesh install` says so: a missing
//! directory must not break building the rest of the workspace.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
struct Kustomization {
    #[serde(default)]
    resources: Vec<String>,
}

fn main() {
    println!("cargo:rerun-if-env-changed=ZMESH_MANIFESTS_DIR");
    let dir = match std::env::var_os("ZMESH_MANIFESTS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let crate_dir =
                std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
            Path::new(&crate_dir).join("..").join("manifests")
        }
    };
    // A directory path makes cargo rescan everything below it, so added files count too.
    println!("cargo:rerun-if-changed={}", dir.display());

    let mut files = Vec::new();
    if dir.join("kustomization.yaml").is_file() {
        collect(&dir, &dir, &mut files);
    } else {
        println!(
            "cargo:warning=no {} : zmesh is built without install manifests",
            dir.join("kustomization.yaml").display()
        );
    }

    let mut out = String::from(
        "/// The install manifests: (path relative to `manifests/`, content), in kustomization order.\n\
         pub const MANIFESTS: &[(&str, &str)] = &[\n",
    );
    for (rel, abs) in &files {
        println!("cargo:rerun-if-changed={}", abs.display());
        let abs = abs
            .to_str()
            .unwrap_or_else(|| panic!("manifest path {} is not UTF-8", abs.display()));
        writeln!(out, "    ({rel:?}, include_str!({abs:?})),").expect("writing to a String");
    }
    out.push_str("];\n");
    let out_dir = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let target = Path::new(&out_dir).join("manifests.rs");
    std::fs::write(&target, out).unwrap_or_else(|e| panic!("writing {}: {e}", target.display()));
}

/// Appends the resources of `kdir/kustomization.yaml` (paths relative to `root`) to `files`.
fn collect(root: &Path, kdir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let kfile = kdir.join("kustomization.yaml");
    println!("cargo:rerun-if-changed={}", kfile.display());
    let text = std::fs::read_to_string(&kfile)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kfile.display()));
    let k: Kustomization = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a valid kustomization: {e}", kfile.display()));
    for res in k.resources {
        let path = kdir.join(&res);
        if path.is_dir() {
            collect(root, &path, files);
        } else if path.is_file() {
            let canonical = path
                .canonicalize()
                .unwrap_or_else(|e| panic!("resolving {}: {e}", path.display()));
            let rel = path
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or(res);
            files.push((rel, canonical));
        } else {
            panic!(
                "{} lists resource {res:?}, but {} does not exist (remote resources are not supported)",
                kfile.display(),
                path.display()
            );
        }
    }
}
