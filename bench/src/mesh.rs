//! The two-node mesh on loopback, as real processes: ztunnel A (node-a) serves the client
//! workload 127.0.0.10, ztunnel B (node-b) serves the server workload 127.0.0.20, which is a
//! `zmesh-bench sink` child. Same topology as `ztunnel/tests/common/mod.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use zmesh_core::ca::CertificateAuthority;

pub const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));
pub const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 20));
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A child process killed (and reaped) when dropped, on every exit path of the bench.
pub struct ChildGuard {
    pub name: &'static str,
    child: Child,
    /// Kept open: the sink exits when it closes.
    _stdin: Option<ChildStdin>,
}

impl ChildGuard {
    pub fn new(name: &'static str, child: Child) -> Self {
        ChildGuard {
            name,
            child,
            _stdin: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => bail!("{} exited early ({status})", self.name),
            Ok(None) => Ok(()),
            Err(e) => bail!("cannot query {}: {e}", self.name),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn `cmd` so that it is killed if the bench dies without running destructors.
pub fn spawn(mut cmd: Command, name: &'static str) -> Result<Child> {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe. PDEATHSIG fires when the *spawning thread* exits: the bench spawns
    // from its main thread only.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))
}

/// Temporary directory (CA files, config, logs), removed on drop unless `keep`.
pub struct WorkDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl WorkDir {
    pub fn create(keep: bool) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("zmesh-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub struct Sink {
    pub proc: ChildGuard,
    pub discard: SocketAddr,
    pub echo: SocketAddr,
}

/// Start the sink (this binary, `sink` subcommand) on the server address.
pub fn start_sink() -> Result<Sink> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    start_sink_with(Command::new(exe), SERVER_IP)
}

/// Start the sink with `cmd` (this binary, possibly set up to enter a netns) on `ip`.
pub fn start_sink_with(mut cmd: Command, ip: IpAddr) -> Result<Sink> {
    cmd.arg("sink")
        .arg("--ip")
        .arg(ip.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = spawn(cmd, "sink")?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let mut proc = ChildGuard {
        name: "sink",
        child,
        _stdin: stdin,
    };
    let stdout = stdout.ok_or_else(|| anyhow!("sink has no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the sink's READY line")?;
    let ports: Vec<u16> = line
        .strip_prefix("READY ")
        .map(|r| {
            r.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if ports.len() != 2 {
        proc.check_running()?;
        bail!("sink did not report its ports (got {line:?})");
    }
    Ok(Sink {
        proc,
        discard: SocketAddr::new(ip, ports[0]),
        echo: SocketAddr::new(ip, ports[1]),
    })
}

/// Distinct free ports (ztunnel's listeners must be named up front).
fn free_ports(ip: IpAddr, n: usize) -> Result<Vec<u16>> {
    zmesh_core::socket::unused_ports(ip, n).context("reserving free ports")
}

fn mesh_yaml() -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/client-ns/client
  name: client
  namespace: client-ns
  serviceAccount: client
  workloadIps: ["{CLIENT_IP}"]
  protocol: HBONE
  node: node-a
- uid: cluster1//v1/Pod/server-ns/server
  name: server
  namespace: server-ns
  serviceAccount: server
  workloadIps: ["{SERVER_IP}"]
  protocol: HBONE
  node: node-b
"#
    )
}

pub struct Ztunnel {
    pub proc: ChildGuard,
    pub socks5: SocketAddr,
    pub readiness: SocketAddr,
    pub log: PathBuf,
}

impl Ztunnel {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

pub struct Mesh {
    pub a: Ztunnel,
    pub b: Ztunnel,
}

pub struct MeshOptions<'a> {
    pub ztunnel: &'a Path,
    pub dir: &'a Path,
    /// `RUST_LOG` for the ztunnels.
    pub log_level: &'a str,
    /// Extra environment for the ztunnels (e.g. `GLIBC_TUNABLES` experiments).
    pub env: &'a [(String, String)],
}

impl Mesh {
    pub fn start(opts: &MeshOptions<'_>) -> Result<Mesh> {
        let ca = CertificateAuthority::generate("cluster.local").context("generating a CA")?;
        let (ca_cert, ca_key) = (opts.dir.join("ca-cert.pem"), opts.dir.join("ca-key.pem"));
        std::fs::write(&ca_cert, ca.root_pem()).context("writing the CA certificate")?;
        std::fs::write(&ca_key, ca.key_pem()).context("writing the CA key")?;
        let config = opts.dir.join("mesh.yaml");
        std::fs::write(&config, mesh_yaml()).context("writing the mesh config")?;

        let hbone = free_ports(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 2)?;
        let local = free_ports(LOCALHOST, 12)?;
        let peers = [
            format!("node-a={}", hbone[0]),
            format!("node-b={}", hbone[1]),
        ];
        let start = |node: &'static str, hbone_port: u16, p: &[u16]| -> Result<Ztunnel> {
            let at = |port: u16| SocketAddr::new(LOCALHOST, port).to_string();
            let log = opts.dir.join(format!("ztunnel-{node}.log"));
            let logf = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let mut cmd = Command::new(opts.ztunnel);
            cmd.args(["--node", node])
                .arg("--local-config")
                .arg(&config)
                .arg("--ca-cert")
                .arg(&ca_cert)
                .arg("--ca-key")
                .arg(&ca_key)
                .args(["--outbound", &at(p[0])])
                .args(["--inbound-plaintext", &at(p[1])])
                .args(["--hbone", &format!("0.0.0.0:{hbone_port}")])
                .args(["--socks5", &at(p[2])])
                .args(["--admin", &at(p[3])])
                .args(["--metrics", &at(p[4])])
                .args(["--readiness", &at(p[5])])
                .arg("--keep-source-address")
                .args(["--peer-hbone-port", &peers[0]])
                .args(["--peer-hbone-port", &peers[1]])
                .env("RUST_LOG", opts.log_level)
                .envs(opts.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(logf.try_clone()?)
                .stderr(logf);
            let name = if node == "node-a" {
                "ztunnel A"
            } else {
                "ztunnel B"
            };
            let child = spawn(cmd, name)?;
            Ok(Ztunnel {
                proc: ChildGuard {
                    name,
                    child,
                    _stdin: None,
                },
                socks5: SocketAddr::new(LOCALHOST, p[2]),
                readiness: SocketAddr::new(LOCALHOST, p[5]),
                log,
            })
        };
        let mut a = start("node-a", hbone[0], &local[..6])?;
        let mut b = start("node-b", hbone[1], &local[6..])?;
        wait_ready(&mut a)?;
        wait_ready(&mut b)?;
        Ok(Mesh { a, b })
    }
}

fn wait_ready(zt: &mut Ztunnel) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Err(e) = zt.proc.check_running() {
            return Err(e.context(format!("see {}:\n{}", zt.log.display(), tail(&zt.log))));
        }
        if http_get_status(zt.readiness, "/healthz/ready").ok() == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready after 30 s; see {}:\n{}",
                zt.proc.name,
                zt.log.display(),
                tail(&zt.log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Status code of `GET path` (HTTP/1.1, no keep-alive).
pub fn http_get_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    Ok(status)
}
