//! Sample TCP echo: replies to every line with `<version> <line>`.
//!
//! `zmesh-sample-tcp-echo --port 9000 --version v1` (or `PORT`, `VERSION` env).
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

fn arg(name: &str, env: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_string())
}

fn serve(conn: TcpStream, version: &str) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        w.write_all(format!("{version} {line}\n").as_bytes())?;
    }
    Ok(())
}

fn main() {
    let port = arg("--port", "PORT", "9000");
    let version = arg("--version", "VERSION", "v1");
    let l = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tcp-echo: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("tcp-echo {version} listening on :{port}");
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        if let Ok(peer) = c.peer_addr() {
            println!("connection from {peer}");
        }
        let v = version.clone();
        std::thread::spawn(move || {
            let _ = serve(c, &v);
        });
    }
}
