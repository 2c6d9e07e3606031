//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is strict (exactly the five path segments Istio accepts) because an identity is
//! what authorization decisions are made on: anything we cannot read exactly is rejected.

use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix of a SPIFFE ID.
pub const SPIFFE_PREFIX: &str = "spiffe://";

/// Trust domain used when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity in Istio's SPIFFE shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a valid identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    NotSpiffe(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadShape(String),
    #[error("identity {0:?} has an empty or invalid {1}")]
    BadSegment(String, &'static str),
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%' | b'+' | b':')
        })
}

impl Identity {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        id.validate()?;
        Ok(id)
    }

    fn validate(&self) -> Result<(), IdentityError> {
        let whole = || self.to_string();
        if !valid_segment(&self.trust_domain) {
            return Err(IdentityError::BadSegment(whole(), "trust domain"));
        }
        if !valid_segment(&self.namespace) {
            return Err(IdentityError::BadSegment(whole(), "namespace"));
        }
        if !valid_segment(&self.service_account) {
            return Err(IdentityError::BadSegment(whole(), "service account"));
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The identity without the `spiffe://` prefix, as Istio's `principals` match it:
    /// `cluster.local/ns/default/sa/sleep`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_PREFIX}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SPIFFE_PREFIX)
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                let id = Identity {
                    trust_domain: (*td).to_string(),
                    namespace: (*ns).to_string(),
                    service_account: (*sa).to_string(),
                };
                id.validate()?;
                Ok(id)
            }
            _ => Err(IdentityError::BadShape(s.to_string())),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = "spiffe://cluster.local/ns/default/sa/sleep";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), s);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn strict_shape() {
        for bad in [
            "cluster.local/ns/default/sa/sleep",
            "spiffe://cluster.local/ns/default/sa",
            "spiffe://cluster.local/ns/default/sa/sleep/extra",
            "spiffe://cluster.local/namespace/default/sa/sleep",
            "spiffe://cluster.local/ns/default/serviceaccount/sleep",
            "spiffe:///ns/default/sa/sleep",
            "spiffe://cluster.local/ns//sa/sleep",
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns/de fault/sa/x",
            "",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn new_validates() {
        assert!(Identity::new("cluster.local", "ns", "sa").is_ok());
        assert!(Identity::new("", "ns", "sa").is_err());
        assert!(Identity::new("td", "a/b", "sa").is_err());
    }
}
