//! `zmesh demo --check` end to end (root; under `CI=true` a missing privilege is a failure,
//! otherwise the test is skipped with a message): exit status 0 and the last line
//! `demo: N passed, 0 failed`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_check_passes() {
    if !zmesh_tests::require_root("demo_check_passes") {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["demo", "--check"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting zmesh demo");
    let mut stdout = child.stdout.take().expect("stdout piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for zmesh demo") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("zmesh demo --check did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let last = out.lines().last().unwrap_or_default();
    let ok_line = last
        .strip_prefix("demo: ")
        .and_then(|r| r.strip_suffix(" passed, 0 failed"))
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    assert!(
        status.success() && ok_line,
        "zmesh demo --check: {status}, last line {last:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
}
