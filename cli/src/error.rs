//! The CLI's errors. Each one is printed as a single `error: …` line naming the object and the
//! reason (the operator reads it in a terminal or a CI log, where a multi-line chain or a
//! backtrace helps nobody), and maps to an exit code.

use std::process::ExitCode;

/// Everything a `zmesh` command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no kubeconfig found (tried {tried}); pass --kubeconfig FILE or set KUBECONFIG")]
    NoKubeconfig { tried: String },

    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },

    #[error("cannot reach the API server at {server}: {reason}")]
    Unreachable { server: String, reason: String },

    /// `what` names the verb, the resource and its scope, e.g. `patch namespaces "shop"`.
    #[error("forbidden: cannot {what}: {message}")]
    Forbidden { what: String, message: String },

    #[error("namespace {0:?} not found")]
    NamespaceNotFound(String),

    #[error("{what} not found")]
    NotFound { what: String },

    #[error("{what}: the API server answered {code} {reason}: {message}")]
    Api {
        what: String,
        code: u16,
        reason: String,
        message: String,
    },

    #[error("{what}: {reason}")]
    Request { what: String, reason: String },

    /// The pod exists but its port could not be used over port-forward (refused inside the
    /// pod, or the stream broke).
    #[error("pod {namespace}/{pod}: port-forward to port {port}: {reason}")]
    PortForward {
        namespace: String,
        pod: String,
        port: u16,
        reason: String,
    },

    #[error("timed out after {secs}s waiting for {what}; last state: {last}")]
    Timeout {
        what: String,
        secs: u64,
        last: String,
    },

    #[error("{0}")]
    Manifest(String),

    /// A bad argument value that clap cannot check (exit code 2, like clap's own errors).
    #[error("{0}")]
    Usage(String),

    /// A command ran but found problems it already reported (e.g. `zmesh check` with FAILs).
    #[error("{0}")]
    Failed(String),

    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }

    /// The message as one line: server messages and I/O errors may contain newlines.
    pub fn one_line(&self) -> String {
        one_line(&self.to_string())
    }
}

/// Collapse whitespace runs (including newlines) to single spaces.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The error and its sources joined with `: `, deduplicated: hyper and tower errors often
/// repeat their source's text in their own message.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    one_line(&parts.join(": "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        let e = CliError::Api {
            what: "apply Deployment zmesh-system/zmesh-controller".into(),
            code: 422,
            reason: "Invalid".into(),
            message: "spec.replicas:\n  must be >= 0".into(),
        };
        assert_eq!(
            e.one_line(),
            "apply Deployment zmesh-system/zmesh-controller: the API server answered 422 Invalid: \
             spec.replicas: must be >= 0"
        );
    }

    #[test]
    fn chain_skips_repeated_text() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect): connection refused")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(
            chain(&Outer(io)),
            "client error (Connect): connection refused"
        );
    }

    #[test]
    fn usage_exits_2() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), ExitCode::from(2));
    }
}
