//! Delta ADS: the versioned resource cache ([`cache`]) and the gRPC server ([`server`]).

pub mod cache;
pub mod server;
