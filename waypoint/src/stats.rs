//! Istio's L7 metrics, reported by the waypoint (`reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`; and Envoy's per-cluster stats as `envoy_cluster_*{cluster_name}`
//! ([`ClusterCollector`]).

use std::fmt;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use zmesh_core::metrics::Metrics;

use crate::Inner;
use crate::upstream::StatKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Default)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

type Hist = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The L7 metric families, registered on the process registry.
pub struct L7Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Hist,
    pub request_bytes: Hist,
    pub response_bytes: Hist,
}

fn duration_hist() -> Histogram {
    // Istio's default buckets for request duration (ms).
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn bytes_hist() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 10,
    ))
}

impl L7Metrics {
    pub fn register(metrics: &Metrics) -> Arc<Self> {
        let m = L7Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_hist as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(bytes_hist as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(bytes_hist as fn() -> Histogram),
        };
        metrics.with_registry(|r| {
            let istio = r.sub_registry_with_prefix("istio");
            istio.register(
                "requests",
                "Requests handled by the waypoint",
                m.requests.clone(),
            );
            istio.register(
                "request_duration_milliseconds",
                "Request duration",
                m.duration.clone(),
            );
            istio.register(
                "request_bytes",
                "Request body sizes",
                m.request_bytes.clone(),
            );
            istio.register(
                "response_bytes",
                "Response body sizes",
                m.response_bytes.clone(),
            );
        });
        Arc::new(m)
    }

    pub fn record(&self, l: &RequestLabels, duration_ms: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.get_or_create(l).inc();
        self.duration.get_or_create(l).observe(duration_ms);
        self.request_bytes
            .get_or_create(l)
            .observe(req_bytes as f64);
        self.response_bytes
            .get_or_create(l)
            .observe(resp_bytes as f64);
    }
}

/// Envoy's cluster stats at scrape time: `envoy_cluster_upstream_rq_pending_overflow_total`
/// (OpenMetrics counters end in `_total`), `envoy_cluster_upstream_rq_pending_active`, …
/// with label `cluster_name` (`outbound|9080|v1|reviews.default.svc.cluster.local`).
/// Holds the upstreams weakly: the registry outlives a stopped waypoint.
pub struct ClusterCollector(pub Weak<Inner>);

impl fmt::Debug for ClusterCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterCollector")
    }
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(inner) = self.0.upgrade() else {
            return Ok(());
        };
        let mut clusters = inner.upstreams.clusters();
        if clusters.is_empty() {
            return Ok(());
        }
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        let rows: Vec<_> = clusters.iter().map(|c| (c, c.envoy_stats())).collect();
        for (i, (stat, kind, _)) in rows[0].1.iter().enumerate() {
            let base = format!("envoy_cluster_{}", stat.replace('.', "_"));
            let name = base.strip_suffix("_total").unwrap_or(&base);
            let help = format!("Envoy cluster stat {stat}");
            let metric_type = match kind {
                StatKind::Counter => ConstCounter::new(0u64).metric_type(),
                StatKind::Gauge => ConstGauge::new(0i64).metric_type(),
            };
            let mut family = encoder.encode_descriptor(name, &help, None, metric_type)?;
            for (c, stats) in &rows {
                let labels = [("cluster_name", c.name.as_str())];
                let sample = family.encode_family(&labels)?;
                let v = stats[i].2;
                match kind {
                    StatKind::Counter => ConstCounter::new(v).encode(sample)?,
                    StatKind::Gauge => {
                        ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(sample)?
                    }
                }
            }
        }
        Ok(())
    }
}
