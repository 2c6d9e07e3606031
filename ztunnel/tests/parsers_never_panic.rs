//! Stable-toolchain companion of ztunnel's fuzz targets (`fuzz/fuzz_targets/ztunnel_*.rs`): the
//! SOCKS5 handshake and the HBONE `forwarded` header get random and mutated input and must be
//! refused, never panic.

#[path = "support/harness.rs"]
mod harness;
#[path = "../../core/tests/support/rng.rs"]
mod rng;

use rng::{Rng, rounds};

#[test]
fn socks5_handshake() {
    let seeds: [&[u8]; 4] = [
        // No-auth greeting, CONNECT 10.0.0.5:8080.
        b"\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x05\x1f\x90",
        // Two methods offered, CONNECT [fd00::1]:443.
        b"\x05\x02\x02\x00\x05\x01\x00\x04\xfd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x01\xbb",
        // CONNECT reviews.default.svc.cluster.local:9080 by name.
        b"\x05\x01\x00\x05\x01\x00\x03\x21reviews.default.svc.cluster.local\x23\x78",
        // BIND: refused.
        b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
    ];
    let dict: &[&[u8]] = &[b"\x05", b"\x00", b"\x03\xff", b"\xff", b"\x04"];
    Rng::new(0x50c_4555).run(
        "SOCKS5",
        rounds(50_000),
        (&seeds, dict, 48),
        harness::socks5,
    );
}

#[test]
fn hbone_forwarded_header() {
    let seeds: [&[u8]; 3] = [
        b"for=\"10.0.0.7:43210\";host=reviews.default.svc.cluster.local",
        b"for=\"[fd00::7]:43210\";host=\"reviews.default.svc.cluster.local\"",
        b"for=10.0.0.1, HOST=a;host=b",
    ];
    let dict: &[&[u8]] = &[b"host=", b"\"", b";", b",", b"=", b" "];
    Rng::new(0xf0_4a4d).run(
        "forwarded",
        rounds(50_000),
        (&seeds, dict, 64),
        harness::forwarded,
    );
}
