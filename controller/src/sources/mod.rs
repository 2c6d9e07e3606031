//! Where Kubernetes objects come from: the API server ([`kube`]) or a YAML directory ([`file`]).
//! Both write into the same [`crate::store::ObjectStore`].

pub mod file;
pub mod kube;
