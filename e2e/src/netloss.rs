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
        Self::start_expr(&format!("{matches} numgen random mod 100 < {percent}"))
    }

    /// Drops the UDP packets matching an nft expression, such as
    /// `udp dport 9000 numgen inc mod 1000 500-699` (bursts of 200 in every
    /// 1000 packets, the first 500 spared).
    pub fn start_expr(expr: &str) -> Self {
        Self::start_exprs(&[expr.to_string()])
    }

    /// One drop rule per expression, in one table.
    pub fn start_exprs(exprs: &[String]) -> Self {
        let table = format!("zd_loss_{}", std::process::id());
        let rules: String = exprs.iter().map(|e| format!("  meta l4proto udp {e} counter drop\n")).collect();
        let rules = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n{rules} }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&rules));
        UdpLoss { table }
    }

    /// Packets the rules dropped so far.
    pub fn dropped(&self) -> u64 {
        let out = nft(&["list", "table", "inet", &self.table], None);
        let words: Vec<&str> = out.split_whitespace().collect();
        words.windows(2).filter(|w| w[0] == "packets").filter_map(|w| w[1].parse::<u64>().ok()).sum()
    }

    /// An nft `meta hour` range for the wallclock seconds from `from_s` to
    /// `to_s` after now, in the local time nft matches against.
    pub fn hour_range(from_s: u64, to_s: u64) -> String {
        let at = |s: u64| {
            let out = Command::new("date").args(["-d", &format!("+{s} sec"), "+%H:%M:%S"]).output().expect("date runs");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        format!("meta hour \"{}\"-\"{}\"", at(from_s), at(to_s))
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
