//! Where Kubernetes objects come from: the API server ([`kube`](mod@kube)) or a YAML directory
//! ([`file`](mod@file)).
//! Both write into the same [`crate::store::ObjectStore`].

pub mod file;
pub mod kube;
