//! A real Kubernetes control plane on loopback for the e2e tests: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kwok (which
//! simulates nodes and marks scheduled pods Running), all real processes built
//! from Go modules by `scripts/controlplane.sh build` and cached by version
//! outside the repository.
//!
//! ```no_run
//! let cluster = zerodrop_e2e::cluster::TestCluster::start()?;
//! let out = cluster.kubectl(["get", "nodes"]);
//! # anyhow::Ok(())
//! ```
//!
//! Everything lives in a temporary directory (certificates, etcd data, the
//! kubeconfig, one log file per component) and is torn down on drop: each
//! component runs in its own process group, which gets SIGTERM, then SIGKILL.
//! Set `ZERODROP_KEEP_CLUSTER=1` to keep the directory (it is also kept when the
//! test panics) and read the logs afterwards.
//!
//! Pod IPs are made up by kwok (from [`ClusterOptions::pod_cidr`]): nothing
//! listens there, so never send traffic to them; unless the cluster runs with
//! [`ClusterOptions::service_proxy`], which gives it a real Service data plane:
//! the real kube-proxy (nftables mode) programs this host's netfilter, and the
//! pod range is routed to this host itself (a `local` route on `lo`), so a
//! process that plays a pod binds its pod IP and a datagram sent to a
//! Service's ClusterIP reaches it. That changes host-wide state (root only),
//! so one such cluster runs per host at a time and undoes it on drop, or at
//! the next start after a crash.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Binaries the harness needs in the cache's `bin/`.
const BINARIES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
];

/// Annotation kwok is told to manage nodes by.
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

/// The apiserver's audit log, in the cluster's directory.
const AUDIT_LOG: &str = "audit.log";
/// Log every request of a ServiceAccount once, when its response is complete
/// (a watch: when it ends); nothing of the control plane's own components,
/// which use the admin certificate.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n- level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n- level: None\n";

/// One request from the apiserver's audit log.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct AuditEvent {
    pub verb: String,
    pub user: AuditUser,
    #[serde(rename = "objectRef", default)]
    pub object: Option<AuditObject>,
    #[serde(rename = "responseStatus", default)]
    pub response: Option<AuditStatus>,
    #[serde(rename = "requestURI", default)]
    pub uri: String,
}

#[derive(Clone, Debug, serde::Deserialize)]
pub struct AuditUser {
    pub username: String,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct AuditObject {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    #[serde(rename = "apiGroup", default)]
    pub api_group: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, serde::Deserialize)]
pub struct AuditStatus {
    #[serde(default)]
    pub code: u16,
}

/// Requests a benchmark counts from the audit log: the Lease renewals of
/// leader election, writes (with how many of each verb and resource, and
/// the first few in full), and reads.
#[derive(Debug, Default, Clone)]
pub struct RequestTally {
    pub reads: u64,
    pub writes: u64,
    pub lease: u64,
    pub writes_by_kind: std::collections::BTreeMap<String, u64>,
    /// The first [`RequestTally::KEEP`] writes, `verb requestURI`.
    pub first_writes: Vec<String>,
}

impl RequestTally {
    pub const KEEP: usize = 20;

    pub fn add(&mut self, events: &[AuditEvent]) {
        for e in events {
            if e.resource() == "coordination.k8s.io/leases" {
                self.lease += 1;
            } else if e.is_write() {
                self.writes += 1;
                *self.writes_by_kind.entry(format!("{} {}", e.verb, e.resource())).or_default() += 1;
                if self.first_writes.len() < Self::KEEP {
                    self.first_writes.push(format!("{} {}", e.verb, e.uri));
                }
            } else {
                self.reads += 1;
            }
        }
    }
}

impl AuditEvent {
    /// `group/resource[/subresource]` (`/statefulsets` style for the core group: `""` group).
    pub fn resource(&self) -> String {
        let o = self.object.clone().unwrap_or_default();
        let mut r = format!("{}/{}", o.api_group, o.resource);
        if !o.subresource.is_empty() {
            r = format!("{r}/{}", o.subresource);
        }
        r
    }

    /// A request that changes something: create, update, patch, delete.
    pub fn is_write(&self) -> bool {
        matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete" | "deletecollection")
    }

    pub fn code(&self) -> u16 {
        self.response.as_ref().map(|r| r.code).unwrap_or(0)
    }
}

/// How the control plane is started. `Default` suits the tests.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `--kube-api-qps` of the controller-manager and the scheduler (their own
    /// default is 20/50). Raise it for benchmarks that create many objects.
    pub kube_api_qps: u32,
    /// `--kube-api-burst` of the controller-manager and the scheduler.
    pub kube_api_burst: u32,
    /// Fake nodes (named `kwok-node-0`, `kwok-node-1`, …) that kwok manages.
    pub fake_nodes: usize,
    /// Pods each fake node admits.
    pub pods_per_node: u32,
    /// Range kwok invents pod IPs from (`first-address/prefix`); no traffic
    /// may be sent there unless [`ClusterOptions::service_proxy`] is on.
    pub pod_cidr: String,
    /// `--service-cluster-ip-range` of the apiserver and controller-manager.
    pub service_cidr: String,
    /// How long to wait for the control plane to come up.
    pub start_timeout: Duration,
    /// Run the real kube-proxy (nftables mode) as the node `kwok-node-0`,
    /// and route `pod_cidr` to this host (`ip route add local <net> dev lo`):
    /// a process may bind a pod's IP, and UDP sent to a Service's ClusterIP
    /// reaches the pod the Service selects. `pod_cidr` must not be loopback
    /// (EndpointSlices refuse loopback addresses). Needs root, `nft` and
    /// `ip`; waits for any other such cluster on this host to end.
    pub service_proxy: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            kube_api_qps: 100,
            kube_api_burst: 200,
            fake_nodes: 1,
            pods_per_node: 1000,
            pod_cidr: "10.244.0.1/16".into(),
            service_cidr: "10.96.0.0/16".into(),
            start_timeout: Duration::from_secs(180),
            service_proxy: false,
        }
    }
}

struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running control plane. Dropping it stops every component.
pub struct TestCluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    bin: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    components: Vec<Component>,
    nodes: Vec<String>,
    /// Kills the components if this process dies without dropping the
    /// cluster (SIGKILL, a timeout, a cluster kept in a `static`).
    reaper: Option<Child>,
    /// The host state the Service data plane changed, with its lock; undone
    /// on drop once kube-proxy is stopped.
    service_proxy: Option<ServiceProxyHost>,
    /// kube-proxy's metrics address, with [`ClusterOptions::service_proxy`].
    kube_proxy_metrics: Option<SocketAddr>,
}

/// The repository root (e2e/..).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e has a parent")
        .to_path_buf()
}

/// The cache's `bin/` directory: `$ZERODROP_CONTROLPLANE_BIN`, else what
/// `scripts/controlplane.sh path` prints (it derives the versions from the
/// go.mod files). Does not check that anything is there.
pub fn controlplane_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ZERODROP_CONTROLPLANE_BIN") {
        return Ok(p.into());
    }
    let script = repo_root().join("scripts/controlplane.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("path")
        .output()
        .with_context(|| format!("running {} path", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} path failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// kwok's Stage configuration, which the build step writes beside `bin/`.
fn kwok_stages(bin: &Path) -> PathBuf {
    bin.parent().unwrap_or(bin).join("kwok/stages.yaml")
}

/// Fails, with the command to run, unless every binary is in the cache.
pub fn check_binaries(bin: &Path) -> Result<()> {
    let mut missing: Vec<String> = BINARIES
        .iter()
        .filter(|b| !bin.join(b).is_file())
        .map(|b| b.to_string())
        .collect();
    if !kwok_stages(bin).is_file() {
        missing.push("kwok/stages.yaml".into());
    }
    if !missing.is_empty() {
        bail!(
            "the control-plane binaries are not built: {} missing from {}.\n{BUILD_HINT}",
            missing.join(", "),
            bin.display()
        );
    }
    Ok(())
}

/// Checks what [`ClusterOptions::service_proxy`] needs before anything
/// starts; returns the pod network to route (e.g. `10.244.0.0/16`).
fn check_service_proxy_options(opts: &ClusterOptions, bin: &Path) -> Result<String> {
    if !bin.join("kube-proxy").is_file() {
        bail!(
            "ClusterOptions::service_proxy needs kube-proxy, missing from {}.\n{BUILD_HINT}",
            bin.display()
        );
    }
    let (net, prefix) = ipv4_network(&opts.pod_cidr).context("ClusterOptions::pod_cidr")?;
    if net.is_loopback() {
        bail!(
            "ClusterOptions::pod_cidr {} is loopback: EndpointSlices refuse loopback addresses, so no Service \
             would have endpoints; the service proxy needs a range such as 10.244.0.1/16",
            opts.pod_cidr
        );
    }
    if opts.fake_nodes == 0 {
        bail!("ClusterOptions::service_proxy needs a fake node for kube-proxy to run as (fake_nodes is 0)");
    }
    Ok(format!("{net}/{prefix}"))
}

const BUILD_HINT: &str = "Run `scripts/controlplane.sh build` first (it builds kube-apiserver, kube-controller-manager, \
     kube-scheduler, kube-proxy, etcd and kwok from Go modules into a cache outside the repository; \
     10-30 minutes the first time, seconds afterwards; only what is missing is built).";

/// Loopback ports that were free a moment ago, all different.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?)
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (install the Debian package `openssl`)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A CA, the apiserver's serving certificate, an admin client certificate
/// (group system:masters) and the service-account signing key, in `dir`.
fn make_pki(dir: &Path, service_ip: &str) -> Result<()> {
    fs::create_dir_all(dir)?;
    let serial = || {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("0x{:x}{:04x}", nanos, std::process::id() & 0xffff)
    };
    let ec_key = |name: &str| {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                name,
            ],
        )
    };
    let req_cnf = |name: &str, dn: &str| -> Result<()> {
        let dn: String = dn
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|kv| format!("{kv}\n"))
            .collect();
        fs::write(
            dir.join(name),
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n{dn}[v3_ca]\nbasicConstraints = critical,CA:TRUE\n\
                 keyUsage = critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier = hash\n"
            ),
        )?;
        Ok(())
    };

    ec_key("ca.key")?;
    req_cnf("ca.cnf", "CN=zerodrop-e2e-ca")?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-config",
            "ca.cnf",
            "-extensions",
            "v3_ca",
            "-days",
            "3650",
            "-out",
            "ca.crt",
        ],
    )?;

    let leaf = |name: &str, dn: &str, ext: &str| -> Result<()> {
        ec_key(&format!("{name}.key"))?;
        req_cnf(&format!("{name}.cnf"), dn)?;
        fs::write(dir.join(format!("{name}.ext")), ext)?;
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-config",
                &format!("{name}.cnf"),
                "-out",
                &format!("{name}.csr"),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial(),
                "-days",
                "3650",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        )
    };
    leaf(
        "apiserver",
        "CN=kube-apiserver",
        &format!(
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1,DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:{service_ip}\n"
        ),
    )?;
    leaf(
        "admin",
        "O=system:masters/CN=zerodrop-e2e-admin",
        "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = clientAuth\n",
    )?;
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}

/// The first address of an IPv4 CIDR plus one (the `kubernetes` Service IP).
fn first_service_ip(cidr: &str) -> Result<String> {
    let base: std::net::Ipv4Addr = cidr
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("service CIDR {cidr}"))?;
    Ok(std::net::Ipv4Addr::from(u32::from(base) + 1).to_string())
}

/// An IPv4 `address/prefix` as its network, e.g. `10.244.0.1/16` →
/// (`10.244.0.0`, 16).
fn ipv4_network(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("{cidr:?} is not an IPv4 CIDR (address/prefix)"))?;
    let addr: Ipv4Addr = addr.parse().with_context(|| format!("the address of CIDR {cidr:?}"))?;
    let prefix: u8 = prefix.parse().with_context(|| format!("the prefix of CIDR {cidr:?}"))?;
    if prefix > 32 {
        bail!("the prefix of CIDR {cidr:?} is over 32");
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

/// Host-wide lock a cluster with a Service data plane holds: the nftables
/// tables `kube-proxy` and the pod range's route are one per host.
const SERVICE_PROXY_LOCK: &str = "/run/zerodrop-service-proxy.lock";
/// What the holder of [`SERVICE_PROXY_LOCK`] set up (`route <net>` lines), so
/// the next start undoes a crashed run's state and never touches a
/// kube-proxy or route it did not make.
const SERVICE_PROXY_STATE: &str = "/run/zerodrop-service-proxy.state";
/// In the cluster's directory: what the reaper runs to undo the host state
/// when the test process died without dropping the cluster.
const SERVICE_PROXY_TEARDOWN: &str = "service-proxy-teardown.sh";

/// Runs a host networking command (`nft`, `ip`); an error names the command,
/// its output, and what to install when it is missing.
fn host_command(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().with_context(|| {
        format!("running `{program}` (the service proxy needs `nft` from the Debian package nftables and `ip` from iproute2)")
    })?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if unsafe { libc::geteuid() } != 0 { " (the service proxy needs root: it changes routes and nftables)" } else { "" }
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The families (`ip`, `ip6`) that have an nftables table named `kube-proxy`.
fn kube_proxy_tables() -> Result<Vec<&'static str>> {
    let tables = host_command("nft", &["list", "tables"])?;
    Ok(["ip", "ip6"]
        .into_iter()
        .filter(|f| tables.lines().any(|l| l.trim() == format!("table {f} kube-proxy")))
        .collect())
}

/// Whether the local routing table has a `local` route for exactly `net`.
fn has_local_route(net: &str) -> Result<bool> {
    Ok(!host_command("ip", &["-o", "route", "show", "table", "local", "type", "local", "exact", net])?
        .trim()
        .is_empty())
}

/// The host side of [`ClusterOptions::service_proxy`]: the lock, and the
/// route of the pod range to this host. kube-proxy's own tables are undone
/// with it.
struct ServiceProxyHost {
    /// Held (flock) while this cluster's Service data plane exists; kube-proxy
    /// inherits it, so it stays held until kube-proxy is gone too.
    lock: File,
    /// The pod network routed to `lo`, e.g. `10.244.0.0/16`.
    pod_net: String,
}

impl ServiceProxyHost {
    /// Takes the host lock (polling every 200 ms while another cluster
    /// holds it, until `deadline`) and undoes what a crashed run left.
    fn acquire(pod_net: &str, deadline: Instant) -> Result<ServiceProxyHost> {
        let mut lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(SERVICE_PROXY_LOCK)
            .with_context(|| format!("opening {SERVICE_PROXY_LOCK} (the service proxy needs root)"))?;
        let mut told = false;
        loop {
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("locking {SERVICE_PROXY_LOCK}"));
            }
            let holder = fs::read_to_string(SERVICE_PROXY_LOCK).unwrap_or_default();
            if !told {
                eprintln!("[cluster] waiting for the service proxy of another cluster (process {}) to end", holder.trim());
                told = true;
            }
            if Instant::now() >= deadline {
                bail!(
                    "another cluster with a service proxy runs on this host (process {}, lock {SERVICE_PROXY_LOCK}); \
                     only one at a time can own the nftables tables `kube-proxy` and the pod range's route",
                    holder.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        lock.set_len(0)?;
        writeln!(lock, "{}", std::process::id())?;
        // Only now is what is there ours to undo (on drop, too).
        Self::undo_stale(pod_net)?;
        Ok(ServiceProxyHost { lock, pod_net: pod_net.to_string() })
    }

    /// Removes the state of a run that died holding the lock (its state
    /// file says what it made); refuses to start beside a kube-proxy table
    /// or pod route this harness did not make.
    fn undo_stale(pod_net: &str) -> Result<()> {
        match fs::read_to_string(SERVICE_PROXY_STATE) {
            Ok(state) => {
                eprintln!("[cluster] undoing the service proxy state a previous run left ({SERVICE_PROXY_STATE})");
                let nets: Vec<&str> = state.lines().filter_map(|l| l.strip_prefix("route ")).collect();
                Self::undo(&nets)
            }
            Err(_) => {
                let tables = kube_proxy_tables()?;
                if !tables.is_empty() {
                    bail!(
                        "this host already has nftables table(s) `kube-proxy` ({}) that the e2e harness did not make \
                         (no {SERVICE_PROXY_STATE}): a real kube-proxy may run here. Stop it, or remove them with \
                         `nft delete table ip kube-proxy` / `nft delete table ip6 kube-proxy`.",
                        tables.join(", ")
                    );
                }
                if has_local_route(pod_net)? {
                    bail!(
                        "this host already has a local route for {pod_net} that the e2e harness did not make \
                         (no {SERVICE_PROXY_STATE}); remove it with `ip route del local {pod_net} dev lo table local` \
                         or choose another ClusterOptions::pod_cidr"
                    );
                }
                Ok(())
            }
        }
    }

    /// Routes the pod range to this host and records it (state file, and
    /// the reaper's teardown script in `cluster_dir`).
    fn route_pods_here(&self, cluster_dir: &Path) -> Result<()> {
        fs::write(SERVICE_PROXY_STATE, format!("route {}\n", self.pod_net))
            .with_context(|| format!("writing {SERVICE_PROXY_STATE}"))?;
        fs::write(
            cluster_dir.join(SERVICE_PROXY_TEARDOWN),
            format!(
                "nft delete table ip kube-proxy 2>/dev/null\nnft delete table ip6 kube-proxy 2>/dev/null\n\
                 ip route del local {net} dev lo table local 2>/dev/null\nrm -f {SERVICE_PROXY_STATE}\n",
                net = self.pod_net
            ),
        )?;
        host_command("ip", &["route", "replace", "local", &self.pod_net, "dev", "lo", "table", "local"])?;
        Ok(())
    }

    /// Deletes kube-proxy's tables and the `local` routes of `nets`, then
    /// the state file.
    fn undo(nets: &[&str]) -> Result<()> {
        for family in kube_proxy_tables()? {
            host_command("nft", &["delete", "table", family, "kube-proxy"])?;
        }
        for net in nets {
            if has_local_route(net)? {
                host_command("ip", &["route", "del", "local", net, "dev", "lo", "table", "local"])?;
            }
        }
        match fs::remove_file(SERVICE_PROXY_STATE) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {SERVICE_PROXY_STATE}"))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for ServiceProxyHost {
    /// Runs once kube-proxy is stopped (the cluster drops its components
    /// first); the lock is released when `lock` closes, after this.
    fn drop(&mut self) {
        if let Err(e) = Self::undo(&[&self.pod_net]) {
            eprintln!("[cluster] could not undo the service proxy's host state: {e:#}");
        }
    }
}

/// The UDP entries of this host's connection tracking table
/// (`/proc/net/nf_conntrack`) whose original destination is `dst`: which
/// pod a flow to a ClusterIP is NATed to (`dst=` of the reply direction
/// names the sender, `src=` the pod).
pub fn udp_conntrack_entries(dst: Ipv4Addr) -> Result<Vec<String>> {
    let table = fs::read_to_string("/proc/net/nf_conntrack")
        .context("reading /proc/net/nf_conntrack (needs root and the nf_conntrack module)")?;
    let needle = format!(" dst={dst} ");
    Ok(table
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("udp"))
        // The original direction's destination is the first `dst=`.
        .filter(|l| l.find(" dst=").is_some_and(|i| l[i..].starts_with(&needle)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect())
}


impl TestCluster {
    /// Starts a control plane with [`ClusterOptions::default`].
    pub fn start() -> Result<TestCluster> {
        Self::start_with(ClusterOptions::default())
    }

    /// Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
    /// kwok on loopback, creates the fake nodes, and returns once the apiserver
    /// is ready, the nodes are Ready and the controller-manager has created the
    /// `default` ServiceAccount.
    pub fn start_with(opts: ClusterOptions) -> Result<TestCluster> {
        let bin = controlplane_bin()?;
        check_binaries(&bin)?;
        let pod_net = if opts.service_proxy {
            Some(check_service_proxy_options(&opts, &bin)?)
        } else {
            None
        };
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("zerodrop-cluster-")
            .tempdir()?;
        let root = dir.path().to_path_buf();
        let pki = root.join("pki");
        let service_ip = first_service_ip(&opts.service_cidr)?;
        make_pki(&pki, &service_ip)?;

        let ports = free_ports(5)?;
        let (etcd_client, etcd_peer, api_port, kcm_port, sched_port) =
            (ports[0], ports[1], ports[2], ports[3], ports[4]);
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = root.join("kubeconfig");
        let b64 = |f: &str| -> Result<String> { Ok(base64(&fs::read(pki.join(f))?)) };
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: zerodrop-e2e\n  cluster:\n    server: {server}\n    \
                 certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {crt}\n    \
                 client-key-data: {key}\ncontexts:\n- name: zerodrop-e2e\n  context:\n    cluster: zerodrop-e2e\n    \
                 user: admin\n    namespace: default\ncurrent-context: zerodrop-e2e\n",
                ca = b64("ca.crt")?,
                crt = b64("admin.crt")?,
                key = b64("admin.key")?,
            ),
        )?;

        let mut cluster = TestCluster {
            dir: Some(dir),
            root: root.clone(),
            bin: bin.clone(),
            kubeconfig: kubeconfig.clone(),
            server,
            components: Vec::new(),
            nodes: Vec::new(),
            reaper: None,
            service_proxy: None,
            kube_proxy_metrics: None,
        };
        cluster.reaper = Some(spawn_reaper(&root)?);
        let deadline = started + opts.start_timeout;
        if let Some(net) = &pod_net {
            cluster.service_proxy = Some(ServiceProxyHost::acquire(net, deadline)?);
        }
        let p = |f: &str| pki.join(f).display().to_string();
        let kc = kubeconfig.display().to_string();

        let audit_policy = root.join("audit-policy.yaml");
        fs::write(&audit_policy, AUDIT_POLICY)?;
        let etcd_data = root.join("etcd");
        cluster.spawn(
            "etcd",
            &[
                "--name=zerodrop-e2e".into(),
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=zerodrop-e2e=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        cluster.wait_until("etcd /health", deadline, || {
            Ok(zerodrop_telemetry::get(SocketAddr::from(([127, 0, 0, 1], etcd_client)), "/health")
                .ok()
                .filter(|r| r.body.contains("\"true\""))
                .map(|_| ()))
        })?;

        cluster.spawn(
            "kube-apiserver",
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                "--authorization-mode=Node,RBAC".into(),
                format!("--service-cluster-ip-range={}", opts.service_cidr),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                // The loopback advertise address may not be an Endpoints address.
                "--endpoint-reconciler-type=none".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                format!("--cert-dir={}", root.join("apiserver-certs").display()),
                // Every request of a ServiceAccount (the operator under test
                // runs as one), one line each: tests count them.
                format!("--audit-policy-file={}", audit_policy.display()),
                format!("--audit-log-path={}", root.join(AUDIT_LOG).display()),
                "--audit-log-format=json".into(),
                "--audit-log-mode=blocking".into(),
                "--v=1".into(),
            ],
        )?;
        cluster.wait_until("kube-apiserver /readyz", deadline, || {
            let out = cluster.kubectl(["get", "--raw=/readyz", "--request-timeout=5s"]);
            Ok(
                (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok")
                    .then_some(()),
            )
        })?;

        let qps = format!("--kube-api-qps={}", opts.kube_api_qps);
        let burst = format!("--kube-api-burst={}", opts.kube_api_burst);
        cluster.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={kcm_port}"),
                format!("--cert-dir={}", root.join("kcm-certs").display()),
                "--controllers=*".into(),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=false".into(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--cluster-signing-cert-file={}", p("ca.crt")),
                format!("--cluster-signing-key-file={}", p("ca.key")),
                format!("--service-cluster-ip-range={}", opts.service_cidr),
                qps.clone(),
                burst.clone(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?;
        cluster.spawn(
            "kube-scheduler",
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={sched_port}"),
                format!("--cert-dir={}", root.join("scheduler-certs").display()),
                "--leader-elect=false".into(),
                qps,
                burst,
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?;
        let mut kwok_args = vec![
            format!("--kubeconfig={kc}"),
            format!("--config={}", kwok_stages(&bin).display()),
            "--manage-all-nodes=false".into(),
            format!("--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake"),
            "--manage-nodes-with-label-selector=".into(),
            format!("--cidr={}", opts.pod_cidr),
            "--node-lease-duration-seconds=40".into(),
        ];
        if pod_net.is_some() {
            // kube-proxy waits 30 s for its Node to have an address. The pod
            // range's first address (kwok's gateway, never a pod's) is local
            // here once the range is routed to this host: a true node IP.
            let gateway = opts.pod_cidr.split('/').next().unwrap_or_default();
            kwok_args.push(format!("--node-ip={gateway}"));
        }
        cluster.spawn("kwok", &kwok_args)?;

        for i in 0..opts.fake_nodes {
            let name = format!("kwok-node-{i}");
            cluster.apply_yaml(&fake_node(&name, opts.pods_per_node))?;
            cluster.nodes.push(name);
        }
        for name in cluster.nodes.clone() {
            cluster.wait_until(&format!("node {name} Ready (kwok)"), deadline, || {
                let out = cluster.kubectl([
                    "get",
                    "node",
                    &name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ]);
                Ok((String::from_utf8_lossy(&out.stdout).trim() == "True").then_some(()))
            })?;
        }
        if let Some(net) = &pod_net {
            cluster.start_kube_proxy(net, deadline)?;
        }
        cluster.wait_until(
            "ServiceAccount default/default (kube-controller-manager)",
            deadline,
            || {
                Ok(cluster
                    .kubectl([
                        "get",
                        "serviceaccount",
                        "default",
                        "-n",
                        "default",
                        "-o",
                        "name",
                    ])
                    .status
                    .success()
                    .then_some(()))
            },
        )?;
        eprintln!(
            "[cluster] control plane up in {:.1}s at {} (kubeconfig {})",
            started.elapsed().as_secs_f64(),
            cluster.server,
            cluster.kubeconfig.display()
        );
        Ok(cluster)
    }

    fn spawn(&mut self, name: &'static str, args: &[String]) -> Result<()> {
        self.spawn_inheriting(name, args, None)
    }

    /// Like [`TestCluster::spawn`]; the component also inherits `fd` (which
    /// is close-on-exec in this process).
    fn spawn_inheriting(&mut self, name: &'static str, args: &[String], fd: Option<RawFd>) -> Result<()> {
        let log = self.root.join(format!("{name}.log"));
        let f = File::create(&log)?;
        let mut cmd = Command::new(self.bin.join(name));
        cmd.args(args)
            .current_dir(&self.root)
            .env("HOME", &self.root)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0);
        if let Some(fd) = fd {
            // In the child, between fork and exec: fcntl is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.join(name).display()))?;
        // The reaper reads this list when the test process is gone.
        let mut pgids = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("pgids"))?;
        writeln!(pgids, "{}", child.id())?;
        self.components.push(Component { name, child, log });
        Ok(())
    }

    /// Routes the pod network `pod_net` to this host, starts kube-proxy
    /// (nftables mode) as the first fake node, and waits until it has
    /// written its rules once (its sync timestamp metric is set at the end of
    /// a successful sync, after its informers have synced).
    fn start_kube_proxy(&mut self, pod_net: &str, deadline: Instant) -> Result<()> {
        let host = self
            .service_proxy
            .as_ref()
            .ok_or_else(|| anyhow!("the service proxy's host lock is not held"))?;
        host.route_pods_here(&self.root)?;
        let lock_fd = host.lock.as_raw_fd();
        let node = self
            .nodes
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("the service proxy needs a fake node to run as (ClusterOptions::fake_nodes is 0)"))?;
        let ports = free_ports(2)?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let kc = self.kubeconfig.display().to_string();
        self.spawn_inheriting(
            "kube-proxy",
            &[
                "--proxy-mode=nftables".into(),
                format!("--kubeconfig={kc}"),
                format!("--hostname-override={node}"),
                format!("--cluster-cidr={pod_net}"),
                // Traffic from outside the pod range to a ClusterIP is
                // masqueraded, as on a real node.
                "--detect-local-mode=ClusterCIDR".into(),
                // 0: leave this host's conntrack sysctls as they are.
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--conntrack-udp-timeout=0".into(),
                "--conntrack-udp-timeout-stream=0".into(),
                // NodePorts only on the fake node's own address, not on
                // every address of this host.
                "--nodeport-addresses=primary".into(),
                // Leave its OOM score alone (it would protect itself, -999).
                "--oom-score-adj=0".into(),
                format!("--metrics-bind-address={metrics}"),
                format!("--healthz-bind-address=127.0.0.1:{}", ports[1]),
                "--v=2".into(),
            ],
            Some(lock_fd),
        )?;
        self.kube_proxy_metrics = Some(metrics);
        self.wait_until("kube-proxy's first sync of its nftables rules", deadline, || {
            let synced = zerodrop_telemetry::get(metrics, "/metrics").ok().is_some_and(|r| {
                r.body.lines().any(|l| {
                    l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds{")
                        && l.contains("ip_family=\"IPv4\"")
                        && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
                })
            });
            Ok((synced && kube_proxy_tables()?.contains(&"ip")).then_some(()))
        })?;
        eprintln!("[cluster] kube-proxy (nftables) synced as {node}; {pod_net} is routed to this host");
        Ok(())
    }

    /// kube-proxy's `/metrics` (sync counts and times, conntrack entries it
    /// deleted); an error unless the cluster runs with
    /// [`ClusterOptions::service_proxy`].
    pub fn kube_proxy_metrics(&self) -> Result<String> {
        let addr = self
            .kube_proxy_metrics
            .ok_or_else(|| anyhow!("this cluster runs no kube-proxy (ClusterOptions::service_proxy is off)"))?;
        let r = zerodrop_telemetry::get(addr, "/metrics").with_context(|| format!("GET http://{addr}/metrics (kube-proxy)"))?;
        if r.status != 200 {
            bail!("GET http://{addr}/metrics (kube-proxy): status {}", r.status);
        }
        Ok(r.body)
    }

    /// The rules kube-proxy wrote (`nft list table ip kube-proxy`), for
    /// diagnostics.
    pub fn service_proxy_rules(&self) -> Result<String> {
        if self.service_proxy.is_none() {
            bail!("this cluster runs no kube-proxy (ClusterOptions::service_proxy is off)");
        }
        host_command("nft", &["list", "table", "ip", "kube-proxy"])
    }

    /// Polls `f` every 200 ms until it yields a value. Fails at `deadline`, or
    /// as soon as a component has exited, with the tails of the component logs.
    pub fn wait_until<T>(
        &self,
        what: &str,
        deadline: Instant,
        mut f: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        loop {
            if let Some(v) = f()? {
                return Ok(v);
            }
            if let Some(dead) = self.exited_component() {
                bail!(
                    "{dead} exited while waiting for {what}\n{}",
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls `f` for up to `timeout`; see [`TestCluster::wait_until`].
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        self.wait_until(what, Instant::now() + timeout, f)
    }

    /// The first component that is no longer running, with its exit status.
    fn exited_component(&self) -> Option<String> {
        self.components.iter().find_map(|c| {
            // try_wait needs &mut; ask the kernel without reaping instead.
            let pid = c.child.id() as libc::pid_t;
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            (r == 0 && unsafe { info.si_pid() } == pid)
                .then(|| format!("{} (exit status {})", c.name, unsafe { info.si_status() }))
        })
    }

    /// The last lines of every component's log, for error messages.
    pub fn diagnostics(&self) -> String {
        let mut s = format!("control-plane logs in {}:\n", self.root.display());
        for c in &self.components {
            s.push_str(&format!(
                "--- {} (last 25 lines of {}) ---\n{}\n",
                c.name,
                c.log.display(),
                tail(&c.log, 25)
            ));
        }
        s
    }

    /// Path of a component's log file (`etcd`, `kube-apiserver`, …).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.root.join(format!("{component}.log"))
    }

    /// The requests `user` made so far (e.g.
    /// `system:serviceaccount:zerodrop-system:zd-zerodrop-operator`), from
    /// the apiserver's audit log, in order. The log is written before each
    /// response is sent (blocking mode), so a request whose answer came back
    /// is in it.
    pub fn audit_events(&self, user: &str) -> Result<Vec<AuditEvent>> {
        let text = fs::read_to_string(self.root.join(AUDIT_LOG)).unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let e: AuditEvent = serde_json::from_str(line).with_context(|| format!("audit log line: {line}"))?;
            if e.user.username == user {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Like [`TestCluster::audit_events`], only the lines written after
    /// `offset` (a byte position this call advances): for following the log
    /// while it grows without reading it all again.
    pub fn audit_events_after(&self, offset: &mut u64, user: &str) -> Result<Vec<AuditEvent>> {
        use std::io::{Seek, SeekFrom};
        let mut file = match File::open(self.root.join(AUDIT_LOG)) {
            Ok(f) => f,
            Err(_) => return Ok(Vec::new()),
        };
        file.seek(SeekFrom::Start(*offset))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        // Only whole lines; a line being written waits for the next call.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        *offset += complete as u64;
        let mut out = Vec::new();
        for line in text[..complete].lines().filter(|l| !l.trim().is_empty()) {
            let e: AuditEvent = serde_json::from_str(line).with_context(|| format!("audit log line: {line}"))?;
            if e.user.username == user {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// A kubeconfig that authenticates with `token` (e.g. from `kubectl
    /// create token`), written as `name` in the cluster's directory.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.root.join(name);
        let ca = base64(&fs::read(self.root.join("pki").join("ca.crt"))?);
        fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: zerodrop-e2e\n  cluster:\n    server: {server}\n    \
                 certificate-authority-data: {ca}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n\
                 - name: zerodrop-e2e\n  context:\n    cluster: zerodrop-e2e\n    user: token\n    namespace: default\n\
                 current-context: zerodrop-e2e\n",
                server = self.server,
            ),
        )?;
        Ok(path)
    }

    /// Admin kubeconfig (client certificate in group system:masters).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The temporary directory holding certificates, data and logs.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The cache's bin/ (etcd, kube-*, kwok, kubectl, helm).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Names of the fake nodes kwok manages.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// A `kubectl` command against this cluster, to add arguments to.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.root.join("kubectl-cache").display()
            ))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.root)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl with `args` and returns its output, whatever its status.
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_command()
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// Runs kubectl with `input` on its standard input (for `apply -f -`).
    pub fn kubectl_stdin<I, S>(&self, args: I, input: &str) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = self
            .kubectl_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        let mut stdin = child.stdin.take().expect("kubectl stdin");
        let input = input.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().expect("waiting for kubectl");
        let _ = writer.join();
        out
    }

    /// Runs kubectl and returns its stdout; an error carrying its stderr when
    /// it fails.
    pub fn kubectl_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.kubectl(&args);
        check(&args, out)
    }

    /// `kubectl apply -f -` with the given YAML; an error when it fails.
    pub fn apply_yaml(&self, yaml: &str) -> Result<String> {
        let out = self.kubectl_stdin(["apply", "-f", "-"], yaml);
        check(&["apply".into(), "-f".into(), "-".into()], out)
    }
}

fn check(args: &[std::ffi::OsString], out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        Err(anyhow!(
            "kubectl {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// A shell that polls every 2 s whether this process is alive and, once it is
/// not, SIGKILLs the process groups listed in `dir/pgids`, undoes the service
/// proxy's host state (if `dir` has its teardown script and the host lock is
/// free within 5 s, i.e. kube-proxy is gone and no newer cluster took it
/// over) and removes `dir` (unless ZERODROP_KEEP_CLUSTER is set).
fn spawn_reaper(dir: &Path) -> Result<Child> {
    fs::write(dir.join("pgids"), "")?;
    Command::new("bash")
        .arg("-c")
        .arg(
            r#"while kill -0 "$0" 2>/dev/null; do sleep 2; done
for g in $(cat "$1/pgids"); do kill -KILL -- "-$g" 2>/dev/null; done
if [ -f "$1/$3" ]; then flock -w 5 "$2" bash "$1/$3"; fi
case "${ZERODROP_KEEP_CLUSTER:-0}" in 0|"") sleep 1; rm -rf "$1" ;; esac"#,
        )
        .arg(std::process::id().to_string())
        .arg(dir)
        .arg(SERVICE_PROXY_LOCK)
        .arg(SERVICE_PROXY_TEARDOWN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the reaper shell")
}

/// A Node object kwok will manage (it sets its status and keeps its lease).
fn fake_node(name: &str, pods: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    {KWOK_NODE_ANNOTATION}: fake
  labels:
    kubernetes.io/arch: amd64
    kubernetes.io/hostname: {name}
    kubernetes.io/os: linux
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: ""
    type: kwok
status:
  allocatable:
    cpu: "1000"
    memory: 4Ti
    pods: "{pods}"
  capacity:
    cpu: "1000"
    memory: 4Ti
    pods: "{pods}"
"#
    )
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Stop in reverse order: kwok and the controllers first, etcd last.
        for c in self.components.iter().rev() {
            unsafe { libc::killpg(c.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut status = 0;
                let r = unsafe {
                    libc::waitpid(c.child.id() as libc::pid_t, &mut status, libc::WNOHANG)
                };
                if r != 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    unsafe { libc::killpg(c.child.id() as libc::pid_t, libc::SIGKILL) };
                    unsafe { libc::waitpid(c.child.id() as libc::pid_t, &mut status, 0) };
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Anything left in the group (none of these fork, but be sure).
            unsafe { libc::killpg(c.child.id() as libc::pid_t, libc::SIGKILL) };
        }
        // kube-proxy is gone: its tables and the pod route can go.
        drop(self.service_proxy.take());
        if let Some(mut reaper) = self.reaper.take() {
            unsafe { libc::killpg(reaper.id() as libc::pid_t, libc::SIGKILL) };
            let _ = reaper.wait();
        }
        let keep = std::thread::panicking()
            || std::env::var_os("ZERODROP_KEEP_CLUSTER").is_some_and(|v| v != "0" && !v.is_empty());
        if let Some(dir) = self.dir.take()
            && keep
        {
            let path = dir.keep();
            eprintln!(
                "[cluster] kept {} (certificates, etcd data, component logs)",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn ipv4_network_masks_the_host_bits() {
        assert_eq!(ipv4_network("10.244.0.1/16").unwrap(), (Ipv4Addr::new(10, 244, 0, 0), 16));
        assert_eq!(ipv4_network("127.1.0.1/16").unwrap(), (Ipv4Addr::new(127, 1, 0, 0), 16));
        assert_eq!(ipv4_network("10.1.2.3/32").unwrap(), (Ipv4Addr::new(10, 1, 2, 3), 32));
        assert_eq!(ipv4_network("10.1.2.3/0").unwrap(), (Ipv4Addr::new(0, 0, 0, 0), 0));
        for bad in ["10.244.0.1", "10.244.0.1/33", "fd00::/64", "10.244.0/16", ""] {
            assert!(ipv4_network(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn service_proxy_refuses_a_loopback_pod_range() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("kube-proxy"), "").unwrap();
        let opts = ClusterOptions { pod_cidr: "127.1.0.1/16".into(), service_proxy: true, ..ClusterOptions::default() };
        let err = check_service_proxy_options(&opts, dir.path()).unwrap_err().to_string();
        assert!(err.contains("loopback"), "{err}");
        let opts = ClusterOptions { service_proxy: true, ..ClusterOptions::default() };
        assert_eq!(check_service_proxy_options(&opts, dir.path()).unwrap(), "10.244.0.0/16");
        let err = check_service_proxy_options(&opts, &dir.path().join("nothing")).unwrap_err().to_string();
        assert!(err.contains("needs kube-proxy, missing from"), "{err}");
    }

    #[test]
    fn service_ip_is_first_host() {
        assert_eq!(first_service_ip("10.96.0.0/16").unwrap(), "10.96.0.1");
    }

    #[test]
    fn pki_is_accepted_by_openssl_verify() {
        let dir = tempfile::tempdir().unwrap();
        make_pki(dir.path(), "10.96.0.1").unwrap();
        for leaf in ["apiserver.crt", "admin.crt"] {
            let out = Command::new("openssl")
                .args(["verify", "-CAfile", "ca.crt", leaf])
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{leaf}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
