//! Sample HTTP service (enough for Bookinfo-like roles): `GET /` returns
//! `{"service":..,"version":..,"headers":{..}}`, `/status/<code>` answers with that status,
//! `/delay/<ms>` waits first, `/ws` with `Connection: upgrade` + `Upgrade: websocket` answers
//! 101 and then echoes each line as `<version> <line>` (at EOF: `<version> bye`, then closes).
//! HTTP/1.1, one request per connection. Each request is logged
//! on stdout (`request GET / HTTP/1.1 host=... x-request-id=...`).
//!
//! `zmesh-sample-http --port 8080 --service reviews --version v2` (or `PORT`, `SERVICE`,
//! `VERSION` env).
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn arg(name: &str, env: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_string())
}

fn serve(conn: TcpStream, service: &str, version: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut request_line = String::new();
    r.read_line(&mut request_line)?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    // One line per request on stdout: scenarios read it to see what reached this pod (a
    // mirrored copy's Host, requests that must not have arrived).
    println!(
        "request {} host={} x-request-id={}",
        request_line.trim_end(),
        headers.get("host").map_or("-", String::as_str),
        headers.get("x-request-id").map_or("-", String::as_str)
    );
    let has = |name: &str, token: &str| {
        headers
            .get(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if path == "/ws" && has("connection", "upgrade") && has("upgrade", "websocket") {
        write!(
            w,
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        )?;
        w.flush()?;
        let mut line = String::new();
        while r.read_line(&mut line)? > 0 {
            writeln!(w, "{version} {}", line.trim_end())?;
            w.flush()?;
            line.clear();
        }
        writeln!(w, "{version} bye")?;
        w.flush()?;
        return w.shutdown(std::net::Shutdown::Write);
    }
    let mut status = 200u16;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse().unwrap_or(400);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        let ms: u64 = ms.parse().unwrap_or(0).min(60_000);
        std::thread::sleep(Duration::from_millis(ms));
    }
    let body = serde_json::json!({
        "service": service,
        "version": version,
        "path": path,
        "headers": headers,
    })
    .to_string();
    write!(
        w,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

fn main() {
    let port = arg("--port", "PORT", "8080");
    let service = arg("--service", "SERVICE", "sample");
    let version = arg("--version", "VERSION", "v1");
    let l = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sample-http: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("sample-http {service} {version} listening on :{port}");
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let (s, v) = (service.clone(), version.clone());
        std::thread::spawn(move || {
            let _ = serve(c, &s, &v);
        });
    }
}
