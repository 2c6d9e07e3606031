//! Seeds A21 (tracing): the waypoint generates a span per request and exports it over
//! OTLP/gRPC; ztunnels only carry bytes. Client → ztunnel A → waypoint → ztunnel B → reviews,
//! with an in-test OpenTelemetry collector (a tonic `TraceService` on 127.0.0.1). The sample
//! app echoes the trace headers it received as `x-seen-<name>`.
//!
//! `waypoint_spans_exported_over_otlp`: tracing fixed by the waypoint's config (its flags); one
//! mesh, scenarios in sequence (the sample servers use fixed addresses); the sampling
//! percentage is changed between them on the running tracer.
//! `tracing_configured_by_telemetry_over_xds`: Istio's way — the controller's mesh config
//! names an OpenTelemetry extension provider, a `Telemetry` resource turns tracing on, and
//! the waypoint follows the resulting `WaypointTelemetry` over Delta ADS.

mod common;
mod xds_mesh;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use waypoint::trace::{Tracer, TracingConfig};
use zmesh_proto::otlp_collector::trace_service_server::{TraceService, TraceServiceServer};
use zmesh_proto::otlp_collector::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use zmesh_proto::otlp_common::{KeyValue, any_value};
use zmesh_proto::otlp_trace::{Span, span, status};

/// What the collector received: (resource attributes, span) per span.
type Received = Arc<Mutex<Vec<(Vec<KeyValue>, Span)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let res = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push((res.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

struct RunningCollector {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningCollector {
    /// Stop it (existing connections are closed) and wait until the port is closed.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("collector stops")
            .unwrap();
    }
}

fn serve_collector(l: TcpListener, received: Received) -> RunningCollector {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let incoming = futures::stream::unfold(l, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(received)))
            .serve_with_incoming_shutdown(incoming, s.cancelled_owned())
            .await
            .unwrap();
    });
    RunningCollector { stop, task }
}

fn attr<'a>(kvs: &'a [KeyValue], k: &str) -> Option<&'a str> {
    kvs.iter()
        .find(|a| a.key == k)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(v) => Some(v.as_str()),
            _ => None,
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The spans received for trace `trace` (hex), after waiting up to 10 s for at least one.
async fn spans_of(received: &Received, trace: &str) -> Vec<(Vec<KeyValue>, Span)> {
    for _ in 0..200 {
        let got: Vec<_> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .cloned()
            .collect();
        if !got.is_empty() {
            // A duplicate would arrive with the same or the next batch.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return received
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| hex(&s.trace_id) == trace)
                .cloned()
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Vec::new()
}

fn seen<'a>(r: &'a Resp, name: &str) -> Option<&'a str> {
    r.headers
        .get(format!("x-seen-{name}"))
        .map(|v| v.to_str().unwrap())
}

/// `00-<trace>-<span>-<flags>` → (trace, span, flags).
fn split_tp(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00", "{tp}");
    (p[1].into(), p[2].into(), p[3].into())
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn stat(
    t: &Tracer,
    f: impl Fn(&waypoint::trace::TraceStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    f(&t.stats).load(Ordering::Relaxed)
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const REVIEWS_HOST: &str = "reviews.default.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_spans_exported_over_otlp() {
    let received: Received = Arc::default();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = l.local_addr().unwrap();
    let collector = serve_collector(l, received.clone());

    let mut tcfg = TracingConfig::new(format!("http://{collector_addr}"));
    tcfg.sampling_percent = 0.0;
    tcfg.flush_interval = Duration::from_millis(50);
    tcfg.queue_capacity = 8;
    tcfg.connect_timeout = Duration::from_secs(1);
    tcfg.export_timeout = Duration::from_secs(2);
    // Long enough that the requests sent during an outage fill the queue.
    tcfg.backoff_initial = Duration::from_secs(2);
    tcfg.backoff_max = Duration::from_secs(4);
    let mesh = Mesh::start_with(|c| c.tracing = Some(tcfg)).await;
    let tracer = mesh.wp.inner.tracer.get().expect("tracing is on");

    // 1. A sampled W3C caller (sampling 0 %: the caller's decision is honoured). The app sees
    //    the caller's trace with the waypoint's span as parent, in both formats; the collector
    //    gets one SERVER span: same trace, parent = the caller's span.
    let tp = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let r = get(
        &mesh,
        "/reviews/1?x=1",
        &[
            ("traceparent", &tp),
            ("tracestate", "vendor=a"),
            ("user-agent", "tracing-test"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let (trace, wp_span, flags) = split_tp(seen(&r, "traceparent").expect("traceparent upstream"));
    assert_eq!(trace, CALLER_TRACE);
    assert_ne!(
        wp_span, CALLER_SPAN,
        "the waypoint's span is the app's parent"
    );
    assert_eq!(flags, "01");
    assert_eq!(seen(&r, "tracestate"), Some("vendor=a"));
    assert_eq!(seen(&r, "x-b3-traceid"), Some(CALLER_TRACE));
    assert_eq!(seen(&r, "x-b3-spanid"), Some(wp_span.as_str()));
    assert_eq!(seen(&r, "x-b3-parentspanid"), Some(CALLER_SPAN));
    assert_eq!(seen(&r, "x-b3-sampled"), Some("1"));
    let request_id = r.headers["x-request-id"].to_str().unwrap().to_string();

    let spans = spans_of(&received, CALLER_TRACE).await;
    assert_eq!(spans.len(), 1, "one span per request: {spans:?}");
    let (res, s) = &spans[0];
    assert_eq!(hex(&s.span_id), wp_span);
    assert_eq!(hex(&s.parent_span_id), CALLER_SPAN);
    assert_eq!(s.name, format!("{REVIEWS_HOST}:9080/*"));
    assert_eq!(s.kind, span::SpanKind::Server as i32);
    assert_eq!(s.trace_state, "vendor=a");
    assert!(s.end_time_unix_nano >= s.start_time_unix_nano && s.start_time_unix_nano > 0);
    assert!(s.status.is_none(), "not an error: {:?}", s.status);
    let a = &s.attributes;
    assert_eq!(attr(a, "http.status_code"), Some("200"));
    assert_eq!(attr(a, "http.method"), Some("GET"));
    assert_eq!(
        attr(a, "http.url"),
        Some("http://reviews:9080/reviews/1?x=1")
    );
    assert_eq!(attr(a, "user_agent"), Some("tracing-test"));
    assert_eq!(attr(a, "guid:x-request-id"), Some(request_id.as_str()));
    assert_eq!(attr(a, "response_flags"), Some("-"));
    assert_eq!(
        attr(a, "upstream_cluster"),
        Some(format!("outbound|9080||{REVIEWS_HOST}").as_str())
    );
    assert_eq!(attr(a, "istio.canonical_service"), Some("waypoint"));
    assert_eq!(attr(a, "istio.namespace"), Some("default"));
    assert_eq!(
        attr(a, "response_size"),
        Some(r.body.len().to_string().as_str())
    );
    assert!(attr(a, "node_id").is_some_and(|n| n.starts_with("waypoint~")));
    assert_eq!(attr(res, "service.name"), Some("waypoint.default"));

    // 2. A B3 caller (64-bit trace id, multi-header, sampled) joins the same way; the app gets
    //    a traceparent too (the 64-bit id zero-padded) and B3 with the 64-bit id as sent.
    let b3_trace = "a3ce929d0e0e4736";
    let b3_span = "1111111111111111";
    let r = get(
        &mesh,
        "/",
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", b3_span),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let (trace, wp_span, flags) = split_tp(seen(&r, "traceparent").unwrap());
    assert_eq!(trace, format!("0000000000000000{b3_trace}"));
    assert_eq!(flags, "01");
    assert_eq!(seen(&r, "x-b3-traceid"), Some(b3_trace));
    assert_eq!(seen(&r, "x-b3-spanid"), Some(wp_span.as_str()));
    assert_eq!(seen(&r, "x-b3-parentspanid"), Some(b3_span));
    let spans = spans_of(&received, &trace).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(hex(&spans[0].1.parent_span_id), b3_span);

    // 3. Sampling 100 %, no context: a new trace; the waypoint's span is the root.
    tracer.set_sampling_percent(100.0).unwrap();
    let r = get(&mesh, "/", &[]).await;
    assert_eq!(r.status, 200);
    let (trace, wp_span, flags) = split_tp(seen(&r, "traceparent").expect("a new trace"));
    assert_ne!(trace, CALLER_TRACE);
    assert_eq!(flags, "01");
    assert_eq!(seen(&r, "x-b3-traceid"), Some(trace.as_str()));
    assert_eq!(seen(&r, "x-b3-spanid"), Some(wp_span.as_str()));
    assert_eq!(seen(&r, "x-b3-parentspanid"), None, "a root has no parent");
    let spans = spans_of(&received, &trace).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(hex(&spans[0].1.span_id), wp_span);
    assert!(spans[0].1.parent_span_id.is_empty());

    // 4. A 5xx from the app: status ERROR, the subset's cluster.
    mesh.apply_l7(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
"#,
    );
    // The failing app echoes nothing: the caller names the trace.
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{trace}-{CALLER_SPAN}-01");
    let r = get(
        &mesh,
        "/",
        &[("x-fail-version", "v1"), ("traceparent", &tp)],
    )
    .await;
    assert_eq!(r.status, 503, "{r:?}");
    let spans = spans_of(&received, trace).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    let s = &spans[0].1;
    assert_eq!(
        s.status.as_ref().map(|st| st.code),
        Some(status::StatusCode::Error as i32)
    );
    assert_eq!(attr(&s.attributes, "http.status_code"), Some("503"));
    assert_eq!(attr(&s.attributes, "error"), Some("true"));
    assert_eq!(
        attr(&s.attributes, "upstream_cluster"),
        Some(format!("outbound|9080|v1|{REVIEWS_HOST}").as_str())
    );
    mesh.apply_l7("");

    // 5. Sampling 0 %: no span, and a request without context passes untouched; an unsampled
    //    caller's context is continued (our span id, flags 00) but nothing is recorded.
    tracer.set_sampling_percent(0.0).unwrap();
    eventually("queue empty", || tracer.queued() == 0).await;
    let before = received.lock().unwrap().len();
    let sent_before = stat(&tracer, |s| &s.spans_sent);
    let r = get(&mesh, "/", &[]).await;
    assert_eq!(r.status, 200);
    for h in TRACE_HEADERS {
        assert_eq!(
            seen(&r, h),
            None,
            "{h} added to an unsampled request without context"
        );
    }
    let unsampled = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-00");
    let r = get(&mesh, "/", &[("traceparent", &unsampled)]).await;
    assert_eq!(r.status, 200);
    let (trace, wp_span, flags) = split_tp(seen(&r, "traceparent").unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (CALLER_TRACE, "00"));
    assert_ne!(wp_span, CALLER_SPAN);
    assert_eq!(seen(&r, "x-b3-sampled"), Some("0"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        received.lock().unwrap().len(),
        before,
        "nothing exported at 0 %"
    );
    assert_eq!(stat(&tracer, |s| &s.spans_sent), sent_before);
    assert_eq!(tracer.queued(), 0);

    // 6. Collector down: requests still succeed, promptly; the spans are counted as failed
    //    (the export attempt) or dropped (the queue full while backing off), never lost
    //    silently.
    collector.stop().await;
    tracer.set_sampling_percent(100.0).unwrap();
    let (failed0, dropped0) = (
        stat(&tracer, |s| &s.spans_failed),
        stat(&tracer, |s| &s.spans_dropped),
    );
    let r = get(&mesh, "/", &[]).await;
    assert_eq!(r.status, 200);
    eventually("a failed export is counted", || {
        stat(&tracer, |s| &s.export_failures) > 0
    })
    .await;
    let n = 24;
    let started = std::time::Instant::now();
    for _ in 0..n {
        let r = get(&mesh, "/", &[]).await;
        assert_eq!(r.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "requests are not slowed by a collector that is down: {:?}",
        started.elapsed()
    );
    let accounted = || {
        stat(&tracer, |s| &s.spans_failed) - failed0 + stat(&tracer, |s| &s.spans_dropped)
            - dropped0
            + tracer.queued() as u64
    };
    eventually("every span failed, dropped or queued", || {
        accounted() == n + 1
    })
    .await;
    assert!(
        stat(&tracer, |s| &s.spans_dropped) > dropped0,
        "the bounded queue dropped spans while the collector was down: {}",
        tracer.stats_text()
    );
    assert!(
        tracer
            .stats_text()
            .contains("tracing.opentelemetry.spans_dropped: ")
    );

    // 7. The collector is back on the same address: after the backoff the exporter reconnects.
    let l = TcpListener::bind(collector_addr).await.unwrap();
    let collector = serve_collector(l, received.clone());
    let mut back = false;
    for _ in 0..60 {
        let r = get(&mesh, "/", &[]).await;
        let (trace, _, _) = split_tp(seen(&r, "traceparent").unwrap());
        tokio::time::sleep(Duration::from_millis(250)).await;
        if received
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| hex(&s.trace_id) == trace)
        {
            back = true;
            break;
        }
    }
    assert!(back, "spans exported again once the collector is back");

    mesh.wp.shutdown();
    collector.stop().await;
}

/// Telemetry YAML: mesh-wide (root namespace) tracing with provider `otel` at `pct` %.
fn telemetry_yaml(pct: f64) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\nspec:\n  tracing:\n  - providers: [{{name: otel}}]\n    randomSamplingPercentage: {pct}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_configured_by_telemetry_over_xds() {
    use xds_mesh::{Net, XdsMesh, local_get, write_atomic};

    let received: Received = Arc::default();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let collector = serve_collector(l, received.clone());
    // The mesh config as the seeds write it (A21), pointing at the in-test collector.
    let mesh_cfg = zmesh_controller::mesh::MeshConfig::parse(
        &format!(
            "enableTracing: true\ndefaultConfig: {{tracing: {{}}}}\nextensionProviders:\n- name: otel\n  opentelemetry: {{port: {port}, service: 127.0.0.1}}\n"
        ),
        None,
    )
    .unwrap();
    let mesh = XdsMesh::start_with(Net(43), "trace", |c| c.translate.mesh = mesh_cfg).await;
    write_atomic(&mesh.dir.join("telemetry.yaml"), &telemetry_yaml(0.0));
    let (wp, _) = mesh
        .start_waypoint_with(|c| {
            c.tracing_defaults.flush_interval = Duration::from_millis(50);
        })
        .await;
    tokio::time::timeout(xds_mesh::WAIT, wp.wait_ready())
        .await
        .expect("waypoint ready");
    let seen = |h: &http::HeaderMap| {
        h.get("x-seen-traceparent")
            .map(|v| v.to_str().unwrap().to_string())
    };

    // Tracing at 0 %: a sampled caller is traced (its decision wins), the span exported to the
    // provider the Telemetry names.
    let trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{trace}-{CALLER_SPAN}-01");
    let mut exported = Vec::new();
    for _ in 0..100 {
        let (status, h, _) = mesh.get_full(&[("traceparent", &tp)]).await.unwrap();
        assert_eq!(status, 200);
        let up = seen(&h).expect("traceparent reaches the app");
        assert!(up.starts_with(&format!("00-{trace}-")), "{up}");
        if !up.contains(CALLER_SPAN) {
            // The waypoint's span is the parent: the tracer is on.
            exported = spans_of(&received, trace).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!exported.is_empty(), "spans reach the Telemetry's provider");
    let (res, s) = &exported[0];
    assert_eq!(hex(&s.parent_span_id), CALLER_SPAN);
    assert_eq!(s.name, "reviews.default.svc.cluster.local:9080/*");
    assert_eq!(attr(res, "service.name"), Some("waypoint.default"));
    let tracer = wp.waypoint.inner.tracer.get().expect("tracing on");
    assert_eq!(tracer.endpoint(), format!("http://127.0.0.1:{port}"));
    assert_eq!(tracer.sampling_percent(), 0.0);
    // No context at 0 %: untouched.
    let (_, h, _) = mesh.get_full(&[]).await.unwrap();
    assert_eq!(seen(&h), None);
    // The counters and the tracer's settings are in the admin API.
    let admin = wp.addrs.admin.unwrap();
    let (_, stats) = local_get(admin, "/stats").await.unwrap();
    assert!(
        stats.contains("tracing.opentelemetry.spans_sent: "),
        "{stats}"
    );
    let (_, dump) = local_get(admin, "/config_dump").await.unwrap();
    assert!(dump.contains("\"otlp_endpoint\""), "{dump}");

    // The Telemetry changes to 100 %: the same tracer samples every new trace.
    write_atomic(&mesh.dir.join("telemetry.yaml"), &telemetry_yaml(100.0));
    let mut new_trace = None;
    for _ in 0..100 {
        let (_, h, _) = mesh.get_full(&[]).await.unwrap();
        if let Some(tp) = seen(&h) {
            new_trace = Some(split_tp(&tp).0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_trace = new_trace.expect("sampling follows the Telemetry");
    assert_eq!(spans_of(&received, &new_trace).await.len(), 1);
    assert!(
        Arc::ptr_eq(&tracer, &wp.waypoint.inner.tracer.get().unwrap()),
        "a sampling change keeps the tracer (and its queue, connection)"
    );

    // The Telemetry is deleted: tracing off, trace headers pass untouched.
    std::fs::remove_file(mesh.dir.join("telemetry.yaml")).unwrap();
    eventually("tracing turned off", || {
        wp.waypoint.inner.tracer.get().is_none()
    })
    .await;
    let (_, h, _) = mesh.get_full(&[("traceparent", &tp)]).await.unwrap();
    assert_eq!(seen(&h).as_deref(), Some(tp.as_str()), "passthrough");

    wp.shutdown().await;
    mesh.shutdown().await;
    collector.stop().await;
}
