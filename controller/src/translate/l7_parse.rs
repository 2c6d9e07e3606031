//! Value parsers shared by the L7 translators: durations, hostnames, percentages, string
//! matchers, CIDRs and the `zmesh.io/rate-limit` annotation. They return an [`Invalid`] reason;
//! [`At::at`] attaches the field path so the caller can report object + field.

use std::net::IpAddr;

use ipnet::IpNet;
use prost_types::Duration;
use zmesh_proto::l7;

/// Suffix of in-cluster service hostnames (Istio's default domain).
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// Why a value was rejected (operator-facing text).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error(
        "`{0}` is not a duration (expected a number with unit ns/us/ms/s/m/h, e.g. \"0.5s\", \"100ms\", \"1m30s\")"
    )]
    Duration(String),
    #[error("invalid regular expression `{pattern}`: {reason}")]
    Regex { pattern: String, reason: String },
    #[error("percentage {0} is outside 0..=100")]
    Percent(f64),
    #[error("{what} must not be negative (got {value})")]
    Negative { what: &'static str, value: i64 },
    #[error("{what} {value} is out of range ({range})")]
    OutOfRange {
        what: &'static str,
        value: i64,
        range: &'static str,
    },
    #[error("`{0}` is not an IP address or CIDR")]
    Cidr(String),
    #[error("set exactly one of {0}")]
    OneOf(&'static str),
    #[error("{0} is required")]
    Required(&'static str),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Bad(String),
}

/// An [`Invalid`] value at a field path ("spec.http[0].timeout").
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: Invalid,
}

/// Attach a field path to a parse result.
pub trait At<T> {
    fn at(self, field: impl Into<String>) -> Result<T, FieldError>;
}

impl<T> At<T> for Result<T, Invalid> {
    fn at(self, field: impl Into<String>) -> Result<T, FieldError> {
        self.map_err(|reason| FieldError {
            field: field.into(),
            reason,
        })
    }
}

/// Shorthand for an error at `field`.
pub fn bad<T>(field: impl Into<String>, reason: Invalid) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        reason,
    })
}

/// Longest duration protobuf's `Duration` holds: 315,576,000,000 s (10 000 years).
pub const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// Parse a Go/Kubernetes/protobuf-JSON duration: "0.5s", "7s", "100ms", "1m", "1h30m", "0".
/// Negative durations and durations longer than [`MAX_DURATION_SECONDS`] are rejected.
pub fn duration(s: &str) -> Result<Duration, Invalid> {
    let err = || Invalid::Duration(s.to_string());
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::default());
    }
    if t.is_empty() {
        return Err(err());
    }
    let mut rest = t;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(err()),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') || frac.len() > 18 {
            return Err(err());
        }
        let int_v: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err())?
        };
        let mut part = int_v.checked_mul(unit_nanos).ok_or_else(err)?;
        if !frac.is_empty() {
            let frac_v: u128 = frac.parse().map_err(|_| err())?;
            part = part
                .checked_add(frac_v * unit_nanos / 10u128.pow(frac.len() as u32))
                .ok_or_else(err)?;
        }
        total = total.checked_add(part).ok_or_else(err)?;
        rest = tail;
    }
    // protobuf's Duration range: waypoints refuse longer ones (and before they did, an
    // ejection time of i64::MAX seconds overflowed their clock arithmetic).
    if total > MAX_DURATION_SECONDS as u128 * 1_000_000_000 {
        return Err(Invalid::Bad(format!(
            "`{s}` is longer than the longest duration, {MAX_DURATION_SECONDS}s (10 000 years)"
        )));
    }
    Ok(Duration {
        seconds: (total / 1_000_000_000) as i64,
        nanos: (total % 1_000_000_000) as i32,
    })
}

/// A duration where zero means "disabled" (Istio `timeout: 0s`): `None` for zero.
pub fn nonzero_duration(s: &str) -> Result<Option<Duration>, Invalid> {
    let d = duration(s)?;
    Ok((d.seconds != 0 || d.nanos != 0).then_some(d))
}

/// Percentage 0..=100.
pub fn percent(v: f64) -> Result<f64, Invalid> {
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(Invalid::Percent(v))
    }
}

/// A non-negative count that fits u32 (weights, connection limits).
pub fn count(what: &'static str, v: i64) -> Result<u32, Invalid> {
    if v < 0 {
        return Err(Invalid::Negative { what, value: v });
    }
    u32::try_from(v).map_err(|_| Invalid::OutOfRange {
        what,
        value: v,
        range: "0..=4294967295",
    })
}

/// An HTTP status code usable in a response.
pub fn http_status(what: &'static str, v: i64) -> Result<u32, Invalid> {
    if (200..=599).contains(&v) {
        Ok(v as u32)
    } else {
        Err(Invalid::OutOfRange {
            what,
            value: v,
            range: "200..=599",
        })
    }
}

/// Istio host resolution: a name without dots is a short Service name in `namespace`
/// ("reviews" → "reviews.default.svc.cluster.local"); anything else is already a hostname.
pub fn fqdn(host: &str, namespace: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    if !h.contains('.') && !h.contains('*') {
        format!("{h}.{namespace}.{CLUSTER_DOMAIN}")
    } else {
        h
    }
}

/// Namespace of a service hostname: `<name>.<ns>.svc.cluster.local` → `<ns>`, else `fallback`.
pub fn host_namespace(host: &str, fallback: &str) -> String {
    if let Some(stem) = host.strip_suffix(&format!(".{CLUSTER_DOMAIN}")) {
        let mut parts = stem.split('.');
        if let (Some(_), Some(ns), None) = (parts.next(), parts.next(), parts.next()) {
            return ns.to_string();
        }
    }
    fallback.to_string()
}

/// Service name of an in-cluster hostname (`reviews.default.svc.cluster.local` → `reviews`).
pub fn host_service_name(host: &str) -> Option<&str> {
    let stem = host.strip_suffix(&format!(".{CLUSTER_DOMAIN}"))?;
    let mut parts = stem.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(_), None) => Some(name),
        _ => None,
    }
}

/// Check an RE2-style pattern compiles (anchored, as the waypoint matches whole values).
pub fn regex(pattern: &str) -> Result<String, Invalid> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map(|_| pattern.to_string())
        .map_err(|e| Invalid::Regex {
            pattern: pattern.to_string(),
            reason: e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string(),
        })
}

/// Istio `StringMatch` at field `f` (exact/prefix/regex, at most one); none set → "present".
pub fn istio_string_match(
    m: &super::types::StringMatch,
    ignore_case: bool,
    f: &str,
) -> Result<l7::StringMatch, FieldError> {
    use l7::string_match::MatchType;
    let set = [&m.exact, &m.prefix, &m.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set > 1 {
        return bad(f, Invalid::OneOf("exact, prefix, regex"));
    }
    let match_type = if let Some(v) = &m.exact {
        MatchType::Exact(v.clone())
    } else if let Some(v) = &m.prefix {
        MatchType::Prefix(v.clone())
    } else if let Some(v) = &m.regex {
        MatchType::Regex(regex(v).at(format!("{f}.regex"))?)
    } else {
        MatchType::Present(true)
    };
    Ok(l7::StringMatch {
        match_type: Some(match_type),
        ignore_case,
    })
}

pub fn exact(v: impl Into<String>) -> l7::StringMatch {
    l7::StringMatch {
        match_type: Some(l7::string_match::MatchType::Exact(v.into())),
        ignore_case: false,
    }
}

/// Istio AuthorizationPolicy value syntax: "*" = present, "*x" = suffix, "x*" = prefix, else
/// exact. Any other `*` (or path templates like `{*}`) is rejected rather than matched
/// literally, which could silently narrow a DENY.
pub fn authz_value(v: &str, ignore_case: bool) -> Result<l7::StringMatch, Invalid> {
    use l7::string_match::MatchType;
    let match_type = if v == "*" {
        MatchType::Present(true)
    } else if let Some(rest) = v.strip_prefix('*') {
        MatchType::Suffix(rest.to_string())
    } else if let Some(rest) = v.strip_suffix('*') {
        MatchType::Prefix(rest.to_string())
    } else {
        MatchType::Exact(v.to_string())
    };
    let inner = match &match_type {
        MatchType::Suffix(s) | MatchType::Prefix(s) | MatchType::Exact(s) => s.as_str(),
        _ => "",
    };
    if inner.contains('*') {
        return Err(Invalid::Unsupported(format!(
            "`{v}`: `*` is only supported as the whole value, a prefix or a suffix"
        )));
    }
    if inner.contains("{*}") || inner.contains("{**}") {
        return Err(Invalid::Unsupported(format!(
            "`{v}`: path templates are not supported"
        )));
    }
    Ok(l7::StringMatch {
        match_type: Some(match_type),
        ignore_case,
    })
}

/// An IP address or CIDR, normalised to "addr/len" with host bits cleared.
pub fn cidr(v: &str) -> Result<String, Invalid> {
    let t = v.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc().to_string());
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip).to_string());
    }
    Err(Invalid::Cidr(v.to_string()))
}

/// A TCP/UDP port given as a number or a string.
pub fn port(v: &serde_json::Value) -> Result<u32, Invalid> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(p) if (1..=65535).contains(&p) => Ok(p as u32),
        _ => Err(Invalid::Bad(format!(
            "`{v}` is not a port number (1..=65535)"
        ))),
    }
}

/// An optional port field: unset is 0 (the default: any port, or the request's), a set one
/// must be 1..=65535 (waypoints refuse larger values rather than cut them to 16 bits).
pub fn opt_port(v: Option<u32>) -> Result<u32, Invalid> {
    match v {
        None => Ok(0),
        Some(p) if (1..=65535).contains(&p) => Ok(p),
        Some(p) => Err(Invalid::OutOfRange {
            what: "port",
            value: i64::from(p),
            range: "1..=65535",
        }),
    }
}

/// The `zmesh.io/rate-limit` annotation: `"<N>/<unit>[ burst=<M>]"`, unit `s`, `m`, `h` or a
/// duration (`"100/30s"`). N tokens are added every unit; the bucket holds `burst` (default N).
pub fn rate_limit(v: &str) -> Result<l7::RateLimit, Invalid> {
    let syntax = || {
        Invalid::Bad(format!(
            "`{v}` is not a rate limit (expected \"<requests>/<s|m|h|duration>[ burst=<n>]\", e.g. \"10/s burst=20\")"
        ))
    };
    let mut words = v.split_whitespace();
    let rate = words.next().ok_or_else(syntax)?;
    let (n, unit) = rate.split_once('/').ok_or_else(syntax)?;
    let n: u32 = n.parse().map_err(|_| syntax())?;
    if n == 0 {
        return Err(Invalid::Bad(format!("`{v}`: the rate must be at least 1")));
    }
    let fill_interval = match unit {
        "s" | "sec" | "second" => duration("1s")?,
        "m" | "min" | "minute" => duration("1m")?,
        "h" | "hour" => duration("1h")?,
        other => duration(other).map_err(|_| syntax())?,
    };
    if fill_interval.seconds == 0 && fill_interval.nanos == 0 {
        return Err(syntax());
    }
    let mut max_tokens = n;
    for w in words {
        match w.split_once('=') {
            Some(("burst", b)) => {
                max_tokens = b.parse().map_err(|_| syntax())?;
                if max_tokens == 0 {
                    return Err(Invalid::Bad(format!("`{v}`: burst must be at least 1")));
                }
            }
            _ => return Err(syntax()),
        }
    }
    Ok(l7::RateLimit {
        max_tokens,
        tokens_per_fill: n,
        fill_interval: Some(fill_interval),
        status: 429,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> (i64, i32) {
        let d = duration(s).unwrap();
        (d.seconds, d.nanos)
    }

    #[test]
    fn durations() {
        assert_eq!(d("0.5s"), (0, 500_000_000));
        assert_eq!(d("7s"), (7, 0));
        assert_eq!(d("100ms"), (0, 100_000_000));
        assert_eq!(d("1m"), (60, 0));
        assert_eq!(d("3m"), (180, 0));
        assert_eq!(d("1h30m"), (5400, 0));
        assert_eq!(d("1.5h"), (5400, 0));
        assert_eq!(d("0"), (0, 0));
        assert_eq!(d("180.000s"), (180, 0));
        for bad in ["", "7", "s", "-1s", "1x", "1.2.3s", "abc", "1s2"] {
            assert!(duration(bad).is_err(), "{bad} should be rejected");
        }
        // protobuf's range: up to 10 000 years.
        assert_eq!(d("315576000000s"), (MAX_DURATION_SECONDS, 0));
        for long in [
            "315576000000.000000001s",
            "9223372036854775807s",
            "2562047788015215h",
        ] {
            let e = duration(long).unwrap_err().to_string();
            assert!(
                e.contains("longer than the longest duration"),
                "{long}: {e}"
            );
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(
            fqdn("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(fqdn("httpbin.org", "default"), "httpbin.org");
        assert_eq!(
            host_namespace("reviews.prod.svc.cluster.local", "x"),
            "prod"
        );
        assert_eq!(host_namespace("httpbin.org", "x"), "x");
        assert_eq!(
            host_service_name("reviews.prod.svc.cluster.local"),
            Some("reviews")
        );
    }

    #[test]
    fn rate_limits() {
        let r = rate_limit("10/s burst=20").unwrap();
        assert_eq!((r.tokens_per_fill, r.max_tokens, r.status), (10, 20, 429));
        assert_eq!(r.fill_interval.unwrap().seconds, 1);
        let r = rate_limit("100/m").unwrap();
        assert_eq!((r.tokens_per_fill, r.max_tokens), (100, 100));
        assert_eq!(r.fill_interval.unwrap().seconds, 60);
        assert_eq!(
            rate_limit("5/30s").unwrap().fill_interval.unwrap().seconds,
            30
        );
        for bad in [
            "",
            "10",
            "x/s",
            "0/s",
            "10/s burst=0",
            "10/s foo=1",
            "10/parsec",
        ] {
            assert!(rate_limit(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn authz_values_and_cidrs() {
        use l7::string_match::MatchType;
        assert_eq!(
            authz_value("*", false).unwrap().match_type,
            Some(MatchType::Present(true))
        );
        assert_eq!(
            authz_value("/api/*", false).unwrap().match_type,
            Some(MatchType::Prefix("/api/".into()))
        );
        assert_eq!(
            authz_value("*.example.com", true).unwrap().match_type,
            Some(MatchType::Suffix(".example.com".into()))
        );
        assert!(authz_value("/a/*/b", false).is_err());
        assert!(authz_value("/a/{*}/b", false).is_err());
        assert_eq!(cidr("1.2.3.4").unwrap(), "1.2.3.4/32");
        assert_eq!(cidr("10.1.2.3/8").unwrap(), "10.0.0.0/8");
        assert_eq!(cidr("fd00::1").unwrap(), "fd00::1/128");
        assert!(cidr("1.2.3.400").is_err());
    }

    #[test]
    fn regexes() {
        assert!(regex("/api/v[0-9]+/.*").is_ok());
        assert!(matches!(regex("(unclosed"), Err(Invalid::Regex { .. })));
    }
}
