//! Translation golden tests: each directory under `tests/golden/` holds Kubernetes YAML (read
//! by the file source, as in production) and `expected.json`, the Address and Authorization
//! resources the controller must produce, rendered through zmesh-core's validated types.
//!
//! `UPDATE_GOLDEN=1 cargo test -p zmesh-controller --test golden` rewrites the expected files;
//! review the diff before committing.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use zmesh_controller::translate::{TranslateOptions, translate};

fn scenarios() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/golden exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty());
    dirs
}

fn actual(dir: &Path) -> Value {
    let (store, source_errors) = common::load_dir(dir);
    let snap = store.snapshot();
    let opts = TranslateOptions::default();
    let mut out = common::render(&translate(&snap, &opts));
    // Translation is a pure function of the snapshot: same input, same output.
    assert_eq!(
        out,
        common::render(&translate(&snap, &opts)),
        "{}: translation is not deterministic",
        dir.display()
    );
    out["sourceErrors"] = common::render_source_errors(dir, &source_errors);
    out
}

#[test]
fn golden() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut failed = Vec::new();
    for dir in scenarios() {
        let got = actual(&dir);
        let path = dir.join("expected.json");
        let pretty = serde_json::to_string_pretty(&got).unwrap() + "\n";
        if update {
            std::fs::write(&path, &pretty).unwrap();
            continue;
        }
        let want: Value = match std::fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s).unwrap(),
            Err(_) => Value::Null,
        };
        if want != got {
            let actual_path = dir.join("actual.json.out");
            std::fs::write(&actual_path, &pretty).unwrap();
            failed.push(format!(
                "{}: output differs from expected.json (actual written to {}; diff them, and run with UPDATE_GOLDEN=1 if the change is intended)",
                dir.display(),
                actual_path.display()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
