//! Loss on the path for transports whose ports the tests do not relay
//! (RTSP over UDP, SRT): an nftables table that drops a share of the UDP
//! packets matching an expression, at random (`numgen random`), with a
//! counter of what it dropped. Needs root; removed on drop.

use std::process::{Command, Stdio};

pub struct UdpLoss {
    table: String,
}

impl UdpLoss {
    /// Drops `percent`% of the UDP packets matching `matches` (an nft
    /// expression such as `udp dport 9000` or `udp sport 47000-47099`) on
    /// their way out of this host's stack (loopback included).
    pub fn start(matches: &str, percent: u32) -> Self {
        let table = format!("zd_loss_{}", std::process::id());
        let rules = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  \
             meta l4proto udp {matches} numgen random mod 100 < {percent} counter drop\n }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&rules));
        UdpLoss { table }
    }

    /// Packets the rule dropped so far.
    pub fn dropped(&self) -> u64 {
        let out = nft(&["list", "table", "inet", &self.table], None);
        out.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    }
}

impl Drop for UdpLoss {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

fn nft(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("nft runs (root, nftables installed by scripts/install-deps.sh)");
    if let Some(text) = stdin {
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("nft reads its rules");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("nft exits");
    assert!(out.status.success(), "nft {args:?} failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
