//! What ztunnel does with untrusted input, one function per fuzz target: the bodies of
//! `fuzz/fuzz_targets/ztunnel_*.rs` (cargo-fuzz) and of `tests/parsers_never_panic.rs`
//! (stable), which both include this file with `#[path]`.

// why: each including crate calls the part it needs.
#![allow(dead_code)]

use http::{HeaderMap, HeaderValue};
use ztunnel::proxy::socks5::{self, Socks5Target};

thread_local! {
    // why: in-memory input never waits, one current-thread runtime serves every call.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

/// A SOCKS5 client's greeting and CONNECT request (15080), as bytes on the socket.
pub fn socks5(data: &[u8]) {
    let mut io = tokio::io::join(data, Vec::new());
    let r = RUNTIME.with(|rt| rt.block_on(socks5::read_request(&mut io)));
    if let Ok(Socks5Target::Domain(name, _)) = r {
        assert!(name.len() <= 255, "a SOCKS5 domain has a one-byte length");
    }
}

/// The `forwarded` header of an HBONE CONNECT, read by the destination ztunnel.
pub fn forwarded(data: &[u8]) {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(http::header::FORWARDED, v);
    let _ = ztunnel::proxy::inbound::forwarded_host(&h);
}
