#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::PrivateKeyDer;
use zmesh_core::identity::Identity;

static KEY: LazyLock<(Identity, PrivateKeyDer<'static>)> = LazyLock::new(|| {
    let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .unwrap();
    let (_, key) = zmesh_core::ca::generate_csr(&id).unwrap();
    (id, key)
});

// The CA's answer (PEM chain, leaf first, root bundle last), parsed by every proxy. The
// chain's elements are separated by NUL bytes.
fuzz_target!(|data: &[u8]| {
    let chain: Vec<String> = data
        .split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let (id, key) = &*KEY;
    let _ =
        zmesh_core::certs::WorkloadCertificate::from_pem_chain(id.clone(), &chain, key.clone_key());
});
