//! How results are shown: kubectl-style aligned tables, `-o yaml|json`, ages, and a progress
//! display for waits (a line rewritten in place on a terminal; plain lines, one per change,
//! when stdout is a pipe or a CI log).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::error::CliError;

/// `-o/--output`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Table,
    Yaml,
    Json,
}

/// Columns separated by three spaces, each as wide as its widest cell, headers in capitals
/// (what `kubectl get` prints).
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == cols {
                    s.push_str(cell);
                } else {
                    s.push_str(cell);
                    s.push_str(&" ".repeat(w - cell.chars().count() + 3));
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Serialize `value` as YAML or (pretty) JSON; `Table` means the caller's default
/// structured form, JSON.
pub fn structured<T: Serialize>(format: Format, value: &T) -> Result<String, CliError> {
    match format {
        Format::Yaml => serde_saphyr::to_string(value)
            .map_err(|e| CliError::Failed(format!("cannot render YAML: {e}"))),
        Format::Json | Format::Table => serde_json::to_string_pretty(value)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| CliError::Failed(format!("cannot render JSON: {e}"))),
    }
}

/// Write to stdout; a closed pipe (`zmesh waypoint list | head -1`) is not an error.
pub fn print(s: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Output(e)),
        _ => Ok(()),
    }
}

/// kubectl's short age: `45s`, `12m`, `5h`, `3d`.
pub fn age(since: Option<Timestamp>, now: Timestamp) -> String {
    let Some(since) = since else {
        return "<unknown>".into();
    };
    let secs = now.as_second().saturating_sub(since.as_second()).max(0);
    short_duration(Duration::from_secs(secs.unsigned_abs()))
}

pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Progress of a wait. On a terminal one line is rewritten in place; otherwise each new state
/// is printed once, so logs stay readable.
pub struct Progress {
    tty: bool,
    last: String,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stdout().is_terminal(),
            last: String::new(),
        }
    }

    /// The current state of what is being waited for.
    pub fn update(&mut self, line: &str) {
        if line == self.last {
            return;
        }
        self.last = line.to_string();
        let mut out = std::io::stdout().lock();
        let _ = if self.tty {
            write!(out, "\r\x1b[2K  … {line}")
        } else {
            writeln!(out, "  … {line}")
        };
        let _ = out.flush();
    }

    /// The wait is over (successfully).
    pub fn done(&mut self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = if self.tty {
            writeln!(out, "\r\x1b[2K✔ {line}")
        } else {
            writeln!(out, "✔ {line}")
        };
        let _ = out.flush();
        self.last.clear();
    }

    /// Leave the terminal line clean before an error is printed.
    pub fn abandon(&mut self) {
        if self.tty && !self.last.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_like_kubectl() {
        let mut t = Table::new(&["namespace", "name", "programmed"]);
        t.row(vec!["shop".into(), "waypoint".into(), "True".into()]);
        t.row(vec!["bookinfo-long".into(), "w".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAMESPACE       NAME       PROGRAMMED\n\
             shop            waypoint   True\n\
             bookinfo-long   w\n"
        );
    }

    #[test]
    fn ages() {
        let now: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let t = |s: &str| Some(s.parse::<Timestamp>().unwrap());
        assert_eq!(age(t("2026-01-01T23:59:15Z"), now), "45s");
        assert_eq!(age(t("2026-01-01T23:00:00Z"), now), "60m");
        assert_eq!(age(t("2026-01-01T00:00:00Z"), now), "24h");
        assert_eq!(age(t("2025-12-01T00:00:00Z"), now), "32d");
        assert_eq!(age(None, now), "<unknown>");
    }

    #[test]
    fn structured_output() {
        let v = serde_json::json!({"a": 1, "b": ["x"]});
        assert_eq!(
            structured(Format::Json, &v).unwrap(),
            "{\n  \"a\": 1,\n  \"b\": [\n    \"x\"\n  ]\n}\n"
        );
        assert_eq!(structured(Format::Yaml, &v).unwrap(), "a: 1\nb:\n- x\n");
    }
}
