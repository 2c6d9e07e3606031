//! TEMPORARY compile stub (replaced by the real module on merge).
use std::sync::Arc;
use crate::identity::Identity;
#[derive(Debug)]
pub struct WorkloadCertificate { pub identity: Identity }
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct CertError;
impl WorkloadCertificate {
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, CertError> { Err(CertError) }
    pub fn client_config(&self, _e: &[Identity]) -> Result<Arc<rustls::ClientConfig>, CertError> { Err(CertError) }
}
pub struct CertificateManager;
impl CertificateManager {
    pub async fn fetch(&self, _id: &Identity) -> Result<Arc<WorkloadCertificate>, CertError> { Err(CertError) }
}
