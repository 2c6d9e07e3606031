//! What every benchmark does with its result: print the table, write the JSON report.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// `v` with `digits` decimals, `-` when not measured.
pub fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// Prints `table` and, when `json` is given, writes `report` there (pretty JSON).
pub fn emit<R: Serialize>(table: &str, report: &R, json: Option<&Path>) -> Result<()> {
    println!("{table}");
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report).context("serializing the results")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
