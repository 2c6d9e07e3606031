//! A tiny blocking HTTP/1.1 client for scenario code: one request at a time on a socket the
//! caller created (usually inside a pod netns with [`crate::Cluster::connect`]), response
//! framed by `Content-Length` or by the peer closing.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;

/// A response as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (the sample app's `{"service", "version", "headers", ...}`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Send `method path` with `Host: host` and `headers` on `s`, then read the response.
pub fn http1_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    read_response(&mut BufReader::new(s))
}

/// Read one response: status line, headers, body (`Content-Length`, else until EOF).
pub fn read_response(r: &mut impl BufRead) -> io::Result<HttpResponse> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP status line: {line:?}")))?;
    let mut resp = HttpResponse {
        status,
        ..HttpResponse::default()
    };
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(bad("connection closed inside the response headers".into()));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            resp.headers
                .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut body = Vec::new();
    match resp.header("content-length").map(str::parse::<usize>) {
        Some(Ok(n)) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        _ => {
            r.read_to_end(&mut body)?;
        }
    }
    resp.body = String::from_utf8_lossy(&body).into_owned();
    Ok(resp)
}
