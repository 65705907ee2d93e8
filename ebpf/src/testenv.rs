//! Support for the privileged tests and the benchmark: skipping with a
//! stated reason (never under `CI=true`, where a skip is a failure), and
//! throwaway network namespaces whose SNMP counters nothing else touches.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Skips (returns) with `why` printed, or panics when `CI=true`.
pub fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true forbids skipping: {why}");
    }
    // Past the test harness's output capture, so the reason is seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// Whether the process runs as root; skips (see [`skip`]) when it does not.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        true
    } else {
        skip(&format!("{test} needs root (network namespaces, nftables, eBPF)"));
        false
    }
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

fn unique() -> u32 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(SEQUENCE.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503))
}

/// A loopback address in 127/8 no other test or process is likely to use:
/// the eBPF maps are node-wide, so tests tell their drops apart by address.
pub fn unique_loopback() -> Ipv4Addr {
    let u = unique();
    Ipv4Addr::new(127, 1 + (u % 250) as u8, ((u >> 8) % 256) as u8, 1 + ((u >> 16) % 250) as u8)
}

/// A network namespace created with `ip netns add`, deleted on drop, with
/// its loopback up.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(tag: &str) -> std::io::Result<Self> {
        let name = format!("zd-{tag}-{:08x}", unique());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Self { name };
        run(Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// Runs `f` on a thread that has entered the namespace: its sockets and
    /// its `/proc/thread-self/net` belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                    // SAFETY: a valid netns fd; setns affects only this thread.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Loads an nftables ruleset into the namespace.
    pub fn nft(&self, ruleset: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped stdin").write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "nft -f in {}: {}: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(command: &mut Command) -> std::io::Result<()> {
    let out = command.stderr(Stdio::piped()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{command:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
