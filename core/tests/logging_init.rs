//! `init_logging` installs a process-global subscriber, so it gets its own test binary.

use std::time::Duration;

use zmesh_core::telemetry::{AccessLog, TelemetryError, capture_access_logs, init_logging};

#[test]
fn init_logging_json_reload_and_capture_coexist() {
    let logs = init_logging("info", true, None).expect("first init succeeds");
    assert!(matches!(
        init_logging("info", false, None),
        Err(TelemetryError::AlreadyInitialized)
    ));
    logs.set("warn,zmesh_core=debug").expect("valid filter");
    assert!(logs.current().contains("zmesh_core=debug"));
    assert!(logs.set("zmesh=notalevel").is_err());

    // Capture works through the subscriber init_logging installed, even with the output at warn.
    let cap = capture_access_logs();
    AccessLog {
        src_workload: Some("init-test".into()),
        direction: "inbound",
        bytes_sent: 1,
        duration: Duration::from_millis(2),
        ..Default::default()
    }
    .emit();
    let lines = cap.lines();
    assert!(
        lines.iter().any(|l| l["src.workload"] == "init-test"),
        "{lines:?}"
    );
    cap.clear();
    assert!(cap.lines().is_empty());
}
