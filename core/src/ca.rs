//! A small certificate authority (rcgen, ECDSA P-256) issuing Istio-shaped workload
//! certificates: URI SAN `spiffe://…` only, EKU serverAuth+clientAuth, chain `[leaf, root]`.
//!
//! Used in-process (tests, single-binary setups) and by the controller's CA service.

use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::certs::WorkloadCertificate;
use crate::identity::Identity;

/// Validity of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of `not_before` to tolerate clock skew between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A root CA: certificate and signing key.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// Why the CA could not be created, loaded or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA for trust domain {trust_domain:?}: cannot generate root key/certificate: {source}")]
    Generate {
        trust_domain: String,
        #[source]
        source: Box<rcgen::Error>,
    },
    #[error("CA root certificate cannot be loaded: {reason}")]
    LoadCertificate { reason: String },
    #[error("CA private key cannot be loaded (expected PEM PKCS#8): {reason}")]
    LoadKey { reason: String },
    #[error("CA private key does not match the public key of the root certificate")]
    KeyMismatch,
    #[error("CA root certificate is not a CA certificate (basicConstraints CA:true missing)")]
    NotCa,
    #[error("CA root certificate has no organization or common name to take the trust domain from")]
    NoTrustDomain,
    #[error("CSR for {identity} is invalid: {reason}")]
    InvalidCsr { identity: Identity, reason: String },
    #[error(
        "CSR for {identity} carries URI SANs {presented:?}; exactly one, equal to {identity}, is required"
    )]
    CsrIdentityMismatch {
        identity: Identity,
        presented: Vec<String>,
    },
    #[error(
        "CA for trust domain {ca_trust_domain:?} refuses to sign {identity}: foreign trust domain"
    )]
    ForeignTrustDomain {
        identity: Identity,
        ca_trust_domain: String,
    },
    #[error("CA cannot sign {identity}: invalid validity window: {reason}")]
    InvalidValidity { identity: Identity, reason: String },
    /// `reason` names the DNS name.
    #[error("CA cannot sign {identity}: invalid DNS SAN {reason}")]
    InvalidDnsName { identity: Identity, reason: String },
    #[error(
        "CA for trust domain {trust_domain:?} failed to sign a certificate for {identity}: {source}"
    )]
    Sign {
        identity: Identity,
        trust_domain: String,
        #[source]
        source: Box<rcgen::Error>,
    },
    #[error("cannot generate a key and CSR for {identity}: {source}")]
    Csr {
        identity: Identity,
        #[source]
        source: Box<rcgen::Error>,
    },
    #[error(transparent)]
    Certificate(#[from] crate::certs::CertError),
}

impl CertificateAuthority {
    /// Self-signed root, ECDSA P-256, CN/O = trust domain, 10 years, CA:true, keyCertSign+cRLSign.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let err = |source| CaError::Generate {
            trust_domain: trust_domain.to_string(),
            source: Box::new(source),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(err)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            root_der: cert.der().clone(),
            root_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Load from PEM root certificate + PEM PKCS#8 key. The trust domain is the root's
    /// organization (or common name).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rustls_pki_types::pem::PemObject;
        let root_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            CaError::LoadCertificate {
                reason: e.to_string(),
            }
        })?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::LoadKey {
            reason: e.to_string(),
        })?;
        let trust_domain = {
            let (_, x509) = x509_parser::parse_x509_certificate(&root_der).map_err(|e| {
                CaError::LoadCertificate {
                    reason: e.to_string(),
                }
            })?;
            if !x509.is_ca() {
                return Err(CaError::NotCa);
            }
            if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::KeyMismatch);
            }
            let subject = x509.subject();
            subject
                .iter_organization()
                .chain(subject.iter_common_name())
                .find_map(|a| a.as_str().ok().map(str::to_string))
                .ok_or(CaError::NoTrustDomain)?
        };
        let issuer =
            Issuer::from_ca_cert_der(&root_der, key).map_err(|e| CaError::LoadCertificate {
                reason: e.to_string(),
            })?;
        Ok(CertificateAuthority {
            trust_domain,
            root_pem: der_to_pem(&root_der),
            root_der,
            key_pem: issuer.key().serialize_pem(),
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// Sign a PEM CSR for `identity`. The CSR must carry exactly one URI SAN, equal to
    /// `identity`, and `identity` must be in this CA's trust domain. Returns `[leaf, root]` PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<String>, CaError> {
        self.check_trust_domain(identity)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::InvalidCsr {
                identity: identity.clone(),
                reason: e.to_string(),
            }
        })?;
        let presented: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str().to_string()),
                _ => None,
            })
            .collect();
        if presented.len() != 1 || presented[0] != identity.to_string() {
            return Err(CaError::CsrIdentityMismatch {
                identity: identity.clone(),
                presented,
            });
        }
        let now = SystemTime::now();
        // why: only the CSR's public key is used; everything else is decided by the CA.
        let request = CertificateSigningRequestParams {
            params: self.leaf_params(identity, now - CLOCK_SKEW, now + lifetime)?,
            public_key: csr.public_key,
        };
        let leaf = request
            .signed_by(&self.issuer)
            .map_err(|source| CaError::Sign {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
                source: Box::new(source),
            })?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }

    /// Issue key + leaf directly with an explicit validity window (no trust-domain check, so
    /// tests can mint expired certificates and certificates of other trust domains).
    pub fn issue(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        self.issue_with_dns(identity, &[], not_before, not_after)
    }

    /// [`Self::issue`] with DNS SANs beside the SPIFFE URI: a server certificate that clients
    /// may also verify by host name (the controller's, for `zmesh-controller.<ns>.svc`).
    pub fn issue_with_dns(
        &self,
        identity: &Identity,
        dns_names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Csr {
                identity: identity.clone(),
                source: Box::new(source),
            })?;
        let mut params = self.leaf_params(identity, not_before, not_after)?;
        for name in dns_names {
            let dns = Ia5String::try_from(name.as_str()).map_err(|e| CaError::InvalidDnsName {
                identity: identity.clone(),
                reason: format!("{name:?}: {e}"),
            })?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Sign {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
                source: Box::new(source),
            })?;
        Ok(WorkloadCertificate::from_parts(
            identity.clone(),
            vec![leaf.der().clone()],
            PrivateKeyDer::from(key),
            vec![self.root_der.clone()],
        )?)
    }

    fn check_trust_domain(&self, identity: &Identity) -> Result<(), CaError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: identity.clone(),
                ca_trust_domain: self.trust_domain.clone(),
            });
        }
        Ok(())
    }

    fn leaf_params(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateParams, CaError> {
        if not_after <= not_before {
            return Err(CaError::InvalidValidity {
                identity: identity.clone(),
                reason: "not_after is not after not_before".into(),
            });
        }
        let mut params = CertificateParams::default();
        // why: Istio workload certificates have an empty subject; rcgen then marks the SAN critical.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(identity).map_err(|source| CaError::Sign {
            identity: identity.clone(),
            trust_domain: self.trust_domain.clone(),
            source: Box::new(source),
        })?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// Generate an ECDSA P-256 key and a PEM CSR with the identity as its only URI SAN.
pub fn generate_csr(identity: &Identity) -> Result<(String, PrivateKeyDer<'static>), CaError> {
    let err = |source| CaError::Csr {
        identity: identity.clone(),
        source: Box::new(source),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri_san(identity).map_err(err)?];
    let csr = params.serialize_request(&key).map_err(err)?;
    let pem = csr.pem().map_err(err)?;
    Ok((pem, PrivateKeyDer::from(key)))
}

fn uri_san(identity: &Identity) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(identity.to_string().try_into()?))
}

/// Random positive 128-bit serial (RFC 5280: positive, at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // why: keep it 16 octets, no leading zero to strip.
    SerialNumber::from_slice(&bytes)
}

fn der_to_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    use x509_parser::prelude::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn dns_sans_beside_the_spiffe_uri_and_bad_names_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let names = vec!["zmesh-controller.zmesh-system.svc".to_string()];
        let cert = ca
            .issue_with_dns(&id(SLEEP), &names, now, now + hour)
            .unwrap();
        let (_, x509) = X509Certificate::from_der(&cert.chain[0]).unwrap();
        let sans: Vec<String> = x509
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                GeneralName::DNSName(d) => format!("dns:{d}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sans,
            vec![format!("uri:{SLEEP}"), format!("dns:{}", names[0])]
        );
        let bad = ca
            .issue_with_dns(&id(SLEEP), &["zmesh-contröller".into()], now, now + hour)
            .unwrap_err();
        assert!(bad.to_string().contains("zmesh-contröller"), "{bad}");
    }

    #[test]
    fn ca_is_send_sync() {
        fn is<T: Send + Sync>() {}
        is::<CertificateAuthority>();
    }

    #[test]
    fn root_shape() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        assert_eq!(ca.trust_domain(), "cluster.local");
        let der = ca.root_der();
        let (_, root) = parse_x509_certificate(&der).unwrap();
        assert!(root.is_ca());
        let ku = root.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(
            root.public_key().algorithm.algorithm,
            OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let cn = root.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "cluster.local");
        let org = root.subject().iter_organization().next().unwrap();
        assert_eq!(org.as_str().unwrap(), "cluster.local");
        let v = root.validity();
        let years = (v.not_after.timestamp() - v.not_before.timestamp()) / (365 * 24 * 3600);
        assert_eq!(years, 10);
        root.verify_signature(None).unwrap();
        assert_eq!(pem_der(&ca.root_pem()), der.to_vec());
    }

    #[test]
    fn csr_signing_round_trip() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let identity = id(SLEEP);
        let (csr, key) = generate_csr(&identity).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let lifetime = Duration::from_secs(3600);
        let chain = ca.sign_csr(&csr, &identity, lifetime).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.root_pem());

        let leaf_der = pem_der(&chain[0]);
        let (_, leaf) = parse_x509_certificate(&leaf_der).unwrap();
        let sans: Vec<_> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .clone();
        assert_eq!(sans, vec![GeneralName::URI(SLEEP)]);
        // P-256 key
        let spki = leaf.public_key();
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap();
        assert_eq!(curve, OID_EC_P256);
        // Requested lifetime (+ the 1 min backdating), to the second.
        let v = leaf.validity();
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((v.not_after.timestamp() - (now + 3600)).abs() <= 2);
        assert!((v.not_before.timestamp() - (now - 60)).abs() <= 2);
        // Leaf, usages, issuer.
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let root_der = ca.root_der();
        let (_, root) = parse_x509_certificate(&root_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());

        // The chain plus our key makes a usable workload certificate.
        let cert = WorkloadCertificate::from_pem_chain(identity.clone(), &chain, key).unwrap();
        assert_eq!(cert.roots, vec![ca.root_der()]);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.serial_hex().len(), 32);
        assert!(!cert.is_expired());
    }

    #[test]
    fn csr_for_other_identity_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (csr, _) = generate_csr(&id(SLEEP)).unwrap();
        let wanted = id("spiffe://cluster.local/ns/default/sa/admin");
        let err = ca
            .sign_csr(&csr, &wanted, Duration::from_secs(3600))
            .unwrap_err();
        assert!(
            matches!(&err, CaError::CsrIdentityMismatch { presented, .. } if presented == &[SLEEP.to_string()])
        );
        let msg = err.to_string();
        assert!(
            msg.contains(SLEEP) && msg.contains(&wanted.to_string()),
            "{msg}"
        );

        // A CSR with no URI SAN at all.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec!["sleep.default.svc".to_string()]).unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &id(SLEEP), Duration::from_secs(60)),
            Err(CaError::CsrIdentityMismatch { .. })
        ));

        // Garbage.
        assert!(matches!(
            ca.sign_csr("not a csr", &id(SLEEP), Duration::from_secs(60)),
            Err(CaError::InvalidCsr { .. })
        ));
    }

    #[test]
    fn foreign_trust_domain_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let foreign = id("spiffe://other.td/ns/default/sa/sleep");
        let (csr, _) = generate_csr(&foreign).unwrap();
        let err = ca
            .sign_csr(&csr, &foreign, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    }

    #[test]
    fn from_pem_round_trip() {
        let ca = CertificateAuthority::generate("mesh.example").unwrap();
        let loaded = CertificateAuthority::from_pem(&ca.root_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.trust_domain(), "mesh.example");
        assert_eq!(loaded.root_der(), ca.root_der());
        assert_eq!(loaded.root_pem(), ca.root_pem());
        assert_eq!(loaded.key_pem(), ca.key_pem());

        // Certificates signed by the loaded CA verify against the original root.
        let identity = id("spiffe://mesh.example/ns/a/sa/b");
        let (csr, _) = generate_csr(&identity).unwrap();
        let chain = loaded
            .sign_csr(&csr, &identity, Duration::from_secs(600))
            .unwrap();
        let leaf_der = pem_der(&chain[0]);
        let (_, leaf) = parse_x509_certificate(&leaf_der).unwrap();
        let root_der = ca.root_der();
        let (_, root) = parse_x509_certificate(&root_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());

        // Mismatched key, non-CA certificate, garbage.
        let other = CertificateAuthority::generate("mesh.example").unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&ca.root_pem(), &other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(&chain[0], &ca.key_pem()),
            Err(CaError::NotCa)
        ));
        assert!(matches!(
            CertificateAuthority::from_pem("nope", &ca.key_pem()),
            Err(CaError::LoadCertificate { .. })
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(&ca.root_pem(), "nope"),
            Err(CaError::LoadKey { .. })
        ));
    }

    #[test]
    fn issue_explicit_window() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let now = SystemTime::now();
        let nb = now - Duration::from_secs(7200);
        let na = now - Duration::from_secs(3600);
        let cert = ca.issue(&id(SLEEP), nb, na).unwrap();
        assert!(cert.is_expired());
        let secs = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(cert.not_before), secs(nb));
        assert_eq!(secs(cert.not_after), secs(na));
        assert!(matches!(
            ca.issue(&id(SLEEP), na, nb),
            Err(CaError::InvalidValidity { .. })
        ));
    }
}
