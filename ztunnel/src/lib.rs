//! ztunnel: the zmesh node agent.
//!
//! It receives the TCP connections of enrolled pods on its node (redirected by eBPF to
//! transparent listeners), carries them to the destination's node inside HBONE — HTTP/2
//! CONNECT over mutual TLS with the pods' SPIFFE identities — and enforces L4 authorization on
//! the receiving side. See ARCHITECTURE.md at the repository root for the big picture.
//!
//! - [`config`]: listener addresses, node identity, peers.
//! - [`app`]: starts and stops everything.
//! - [`proxy`]: the listeners and per-connection logic.

pub mod app;
pub mod config;
pub mod proxy;
pub mod redirect;

pub use app::Ztunnel;
pub use config::Config;
