//! A process's CPU time and memory from `/proc`, for the benchmarks that
//! measure another process (the operator).

/// `utime + stime` of process `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces and
    // parentheses) start after its last ')': state is the first, utime the
    // 12th and stime the 13th.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// A `/proc/PID/status` memory field (`"VmRSS:"`, `"VmHWM:"`), in MiB.
pub fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_a_resident_set() {
        // Burn a little CPU so that at least a tick is counted.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let cpu = cpu_seconds(std::process::id()).expect("utime + stime");
        assert!(cpu > 0.0, "{cpu}");
        let rss = memory_mib(std::process::id(), "VmRSS:").expect("VmRSS");
        assert!(rss > 1.0, "{rss} MiB");
        assert!(memory_mib(std::process::id(), "NoSuchField:").is_none());
    }
}
