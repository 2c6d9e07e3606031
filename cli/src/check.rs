//! `zmesh check`: pre-flight checks before (and after) `zmesh install`.
//!
//! Local checks describe the machine the CLI runs on, which matters when that is a node: kernel
//! ≥ 6.6 (ztunnel attaches its tc programs as TCX links, new in 6.6; `bpf_sk_assign` at tc
//! ingress alone would need 5.7), bpffs mounted, `bpf()` permitted. Cluster checks
//! use the API: reachable, every node's kernel (from `status.nodeInfo`, the authoritative
//! answer), the Gateway API CRDs (a prerequisite), zmesh's own CRDs, and other meshes whose
//! node agents or control planes would fight over the same pods and labels, and what the
//! kubeconfig's user may do (install, enroll, waypoints, port-forward to ztunnel's admin port).
//!
//! A check that cannot run (not root, forbidden) is a WARN, never a silent OK. Exit status 1
//! when any check FAILs.

use serde::Serialize;
use serde_json::Value;

use crate::error::CliError;
use crate::kube::{self, CRD, ConnectOptions, DAEMONSET, DEPLOYMENT, Kube, NAMESPACE, NODE};
use crate::manifests;
use crate::output::{Format, Table, print, structured};

/// Oldest kernel ztunnel runs on: TCX links (`ebpf/src/tc.rs`), see README's kernel table.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

/// [`MIN_KERNEL`] as people write it.
fn min_kernel() -> String {
    format!("{}.{}", MIN_KERNEL.0, MIN_KERNEL.1)
}
const GATEWAY_CRD: &str = "gateways.gateway.networking.k8s.io";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub check: String,
    pub status: Status,
    pub message: String,
}

fn check(name: &str, status: Status, message: impl Into<String>) -> Check {
    Check {
        check: name.to_string(),
        status,
        message: message.into(),
    }
}

/// `(major, minor)` of a kernel release such as `6.1.0-18-amd64` or `5.15.0-1051-azure`.
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn local_release() -> Option<String> {
    // SAFETY: uname fills the zero-initialised struct; the fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

fn local_kernel() -> Check {
    const NAME: &str = "local kernel";
    match local_release() {
        None => check(NAME, Status::Warn, "unknown: uname failed"),
        Some(rel) => match parse_kernel(&rel) {
            Some(v) if v >= MIN_KERNEL => {
                check(NAME, Status::Ok, format!("{rel} (≥ {})", min_kernel()))
            }
            Some(_) => check(
                NAME,
                Status::Warn,
                format!(
                    "{rel} is older than {}: ztunnel cannot run on this machine (fine if it is not a node)",
                    min_kernel()
                ),
            ),
            None => check(
                NAME,
                Status::Warn,
                format!("cannot parse kernel release {rel:?}"),
            ),
        },
    }
}

fn bpffs() -> Check {
    const NAME: &str = "bpffs";
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs writes into the zero-initialised struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return check(
            NAME,
            Status::Warn,
            format!(
                "/sys/fs/bpf: {} (needed on nodes)",
                std::io::Error::last_os_error()
            ),
        );
    }
    #[allow(clippy::unnecessary_cast)] // f_type's integer type differs between architectures.
    if st.f_type as i64 == BPF_FS_MAGIC {
        check(NAME, Status::Ok, "/sys/fs/bpf is a bpf filesystem")
    } else {
        check(
            NAME,
            Status::Warn,
            "/sys/fs/bpf is not a bpf filesystem (ztunnel pins its maps there; mount bpffs on nodes)",
        )
    }
}

fn bpf_syscall() -> Check {
    const NAME: &str = "bpf() syscall";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return check(
            NAME,
            Status::Warn,
            "unknown: run as root on a node to check",
        );
    }
    // BPF_MAP_CREATE of a one-entry array map: the smallest request that proves bpf() works.
    // The attribute union is zero-filled past the four fields, as the kernel requires.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4; // key_size
    attr[2] = 4; // value_size
    attr[3] = 1; // max_entries
    // SAFETY: attr is a valid, fully initialised buffer of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: fd was just returned by the kernel and is ours.
        unsafe { libc::close(fd as i32) };
        return check(
            NAME,
            Status::Ok,
            "permitted (created and closed a test map)",
        );
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => check(
            NAME,
            Status::Fail,
            format!("not permitted even as root ({err}): lockdown or a seccomp policy blocks eBPF"),
        ),
        _ => check(NAME, Status::Warn, format!("failed: {err}")),
    }
}

/// A cluster check that could not run because of RBAC is a WARN.
fn cannot(name: &str, e: CliError) -> Check {
    match e {
        CliError::Forbidden { .. } => check(
            name,
            Status::Warn,
            format!("cannot check: {}", e.one_line()),
        ),
        e => check(name, Status::Fail, e.one_line()),
    }
}

async fn node_kernels(kube: &Kube) -> Check {
    const NAME: &str = "node kernels";
    let nodes = match kube.list(&NODE, None, None).await {
        Ok(n) => n,
        Err(e) => return cannot(NAME, e),
    };
    let mut old = Vec::new();
    let mut min: Option<((u32, u32), String)> = None;
    for n in &nodes {
        let v = serde_json::to_value(n).unwrap_or_default();
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let rel = v
            .pointer("/status/nodeInfo/kernelVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match parse_kernel(rel) {
            Some(k) => {
                if k < MIN_KERNEL {
                    old.push(format!("{name} ({rel})"));
                }
                if min.as_ref().is_none_or(|(m, _)| k < *m) {
                    min = Some((k, rel.to_string()));
                }
            }
            None => old.push(format!("{name} (kernel unknown)")),
        }
    }
    if nodes.is_empty() {
        check(NAME, Status::Warn, "no nodes found")
    } else if !old.is_empty() {
        check(
            NAME,
            Status::Fail,
            format!("older than {} or unknown: {}", min_kernel(), old.join(", ")),
        )
    } else {
        let min = min.map(|(_, r)| r).unwrap_or_default();
        check(
            NAME,
            Status::Ok,
            format!("{} node(s), oldest kernel {min}", nodes.len()),
        )
    }
}

async fn gateway_api(kube: &Kube) -> Check {
    const NAME: &str = "Gateway API CRDs";
    match kube.get_opt(&CRD, None, GATEWAY_CRD).await {
        Ok(Some(_)) => check(NAME, Status::Ok, format!("{GATEWAY_CRD} present")),
        Ok(None) => check(
            NAME,
            Status::Fail,
            format!(
                "{GATEWAY_CRD} missing: install the Gateway API CRDs (standard channel) before waypoints"
            ),
        ),
        Err(e) => cannot(NAME, e),
    }
}

async fn zmesh_crds(kube: &Kube) -> Check {
    const NAME: &str = "zmesh CRDs";
    let docs = manifests::parse(manifests::files()).unwrap_or_default();
    let names: Vec<&str> = docs
        .iter()
        .filter(|d| d.is_crd())
        .map(|d| d.name())
        .collect();
    if names.is_empty() {
        return check(
            NAME,
            Status::Warn,
            "this zmesh binary embeds no manifests to compare with",
        );
    }
    let mut missing = Vec::new();
    for n in &names {
        match kube.get_opt(&CRD, None, n).await {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(*n),
            Err(e) => return cannot(NAME, e),
        }
    }
    if missing.is_empty() {
        check(NAME, Status::Ok, format!("all {} present", names.len()))
    } else if missing.len() == names.len() {
        check(
            NAME,
            Status::Warn,
            "not installed yet (`zmesh install` creates them)",
        )
    } else {
        check(
            NAME,
            Status::Fail,
            format!("missing: {} (re-run `zmesh install`)", missing.join(", ")),
        )
    }
}

async fn other_meshes(kube: &Kube) -> Vec<Check> {
    const NAME: &str = "other meshes";
    let mut out = Vec::new();
    match kube.get_opt(&NAMESPACE, None, "istio-system").await {
        Ok(Some(_)) => match kube.list(&DEPLOYMENT, Some("istio-system"), None).await {
            Ok(deps) if deps.iter().any(|d| d.metadata.name.as_deref().is_some_and(|n| n.starts_with("istiod"))) => {
                out.push(check(
                    NAME,
                    Status::Fail,
                    "istiod runs in istio-system: Istio and zmesh would both act on istio.io labels and Gateways",
                ))
            }
            Ok(_) => out.push(check(NAME, Status::Warn, "namespace istio-system exists (no istiod Deployment)")),
            Err(e) => out.push(cannot(NAME, e)),
        },
        Ok(None) => {}
        Err(e) => out.push(cannot(NAME, e)),
    }
    match kube.get_opt(&NAMESPACE, None, "linkerd").await {
        Ok(Some(_)) => out.push(check(
            NAME,
            Status::Warn,
            "namespace linkerd exists: do not enroll Linkerd-injected pods (double proxying)",
        )),
        Ok(None) => {}
        Err(e) => out.push(cannot(NAME, e)),
    }
    let docs = manifests::parse(manifests::files()).unwrap_or_default();
    let ours = manifests::find(&docs, "DaemonSet");
    match kube.list(&DAEMONSET, None, None).await {
        Ok(list) => {
            let foreign: Vec<String> = list
                .iter()
                .filter_map(|d| {
                    let ns = d.metadata.namespace.clone().unwrap_or_default();
                    let name = d.metadata.name.clone().unwrap_or_default();
                    let agent = name.starts_with("istio-cni") || name == "ztunnel";
                    let is_ours = ours
                        .as_ref()
                        .is_some_and(|(ons, oname)| *ons == ns && *oname == name);
                    (agent && !is_ours).then(|| format!("{ns}/{name}"))
                })
                .collect();
            if !foreign.is_empty() {
                out.push(check(
                    NAME,
                    Status::Fail,
                    format!(
                        "another mesh's node agent runs: DaemonSet {} (two agents would redirect the same pods)",
                        foreign.join(", ")
                    ),
                ));
            }
        }
        Err(e) => out.push(cannot(NAME, e)),
    }
    if out.is_empty() {
        out.push(check(
            NAME,
            Status::Ok,
            "no istiod, Linkerd, istio-cni or foreign ztunnel found",
        ));
    }
    out
}

/// What the kubeconfig's user may do, for the commands that need it (SelfSubjectAccessReview,
/// as `kubectl auth can-i`): a missing permission is a WARN naming the commands it breaks,
/// since `check` may run as someone other than the operator who installs.
async fn permissions(kube: &Kube, system_ns: &str) -> Check {
    const NAME: &str = "permissions";
    // (verb, group, resource, namespace, the commands that need it)
    let wanted: [(&str, &str, &str, Option<&str>, &str); 5] = [
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            "zmesh install",
        ),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            "zmesh install",
        ),
        ("patch", "", "namespaces", None, "zmesh enroll"),
        (
            "create",
            "gateway.networking.k8s.io",
            "gateways",
            None,
            "zmesh waypoint",
        ),
        (
            "create",
            "",
            "pods/portforward",
            Some(system_ns),
            "zmesh status, zmesh config-dump",
        ),
    ];
    let mut missing = Vec::new();
    for (verb, group, resource, ns, needed_by) in wanted {
        match kube.can_i(verb, group, resource, ns).await {
            Ok(true) => {}
            Ok(false) => {
                let scope = ns.map(|n| format!(" in {n}")).unwrap_or_default();
                missing.push(format!("{verb} {resource}{scope} (for {needed_by})"));
            }
            Err(e) => return cannot(NAME, e),
        }
    }
    if missing.is_empty() {
        check(
            NAME,
            Status::Ok,
            "may install, enroll, deploy waypoints and port-forward to ztunnel",
        )
    } else {
        check(NAME, Status::Warn, format!("cannot {}", missing.join("; ")))
    }
}

pub async fn collect(opts: &ConnectOptions) -> Vec<Check> {
    let mut checks = vec![local_kernel(), bpffs(), bpf_syscall()];
    const API: &str = "API server";
    let kube = match kube::connect(opts).await {
        Ok(k) => k,
        Err(e) => {
            checks.push(check(API, Status::Fail, e.one_line()));
            return checks;
        }
    };
    match kube.client.apiserver_version().await {
        Ok(v) => checks.push(check(
            API,
            Status::Ok,
            format!("{} reachable (Kubernetes {})", kube.server, v.git_version),
        )),
        Err(e) => {
            let op = kube::Op::new("get", "version", None, None);
            checks.push(check(API, Status::Fail, kube.error(&op, e).one_line()));
            return checks;
        }
    }
    checks.push(node_kernels(&kube).await);
    checks.push(gateway_api(&kube).await);
    checks.push(zmesh_crds(&kube).await);
    checks.extend(other_meshes(&kube).await);
    checks.push(permissions(&kube, &manifests::system_namespace()).await);
    checks
}

pub fn table(checks: &[Check]) -> Table {
    let mut t = Table::new(&["check", "status", "message"]);
    for c in checks {
        let status = match c.status {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        t.row(vec![c.check.clone(), status.into(), c.message.clone()]);
    }
    t
}

pub async fn run(opts: &ConnectOptions, format: Format) -> Result<(), CliError> {
    let checks = collect(opts).await;
    if format == Format::Table {
        print(&table(&checks).render())?;
    } else {
        print(&structured(format, &checks)?)?;
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failed > 0 {
        return Err(CliError::Failed(format!("{failed} check(s) failed")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_kernel("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel("5.15.0-1051-azure"), Some((5, 15)));
        assert_eq!(parse_kernel("4.19.0"), Some((4, 19)));
        assert!(parse_kernel("5.4.0") < Some(MIN_KERNEL));
        // Debian 12's kernel has bpf_sk_assign at tc ingress but no TCX links.
        assert!(parse_kernel("6.1.0-18-amd64") < Some(MIN_KERNEL));
        assert!(parse_kernel("6.6.0") >= Some(MIN_KERNEL));
        assert!(parse_kernel("6.18.44-fc-v657") >= Some(MIN_KERNEL));
        assert_eq!(parse_kernel("garbage"), None);
    }

    #[test]
    fn local_checks_never_panic() {
        for c in [local_kernel(), bpffs(), bpf_syscall()] {
            assert!(!c.message.is_empty());
        }
    }

    #[test]
    fn table_rows() {
        let t = table(&[
            check("a", Status::Ok, "fine"),
            check("bb", Status::Fail, "broken"),
        ]);
        assert_eq!(
            t.render(),
            "CHECK   STATUS   MESSAGE\na       OK       fine\nbb      FAIL     broken\n"
        );
    }
}
