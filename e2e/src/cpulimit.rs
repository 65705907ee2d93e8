//! A CPU limit on a process, as a container's `resources.limits.cpu` sets
//! it: a CFS quota per period in a cgroup of its own (cgroup v1's `cpu`
//! controller, or v2's `cpu.max`). A process that needs more than its quota
//! is throttled until the next period, which is how a CPU-limited data-plane
//! pod falls behind its sockets. Root only.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// The cgroup; removed on drop (once the process in it has exited).
pub struct CpuLimit {
    dir: PathBuf,
}

/// The CFS period Kubernetes uses for container limits by default (the
/// kubelet's `--cpu-cfs-quota-period`).
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(100);

impl CpuLimit {
    /// Puts process `pid` (all its threads) into a new cgroup `name` limited
    /// to `cores` of a core (e.g. 0.05 for 50 millicores) per `period`.
    pub fn apply(name: &str, pid: u32, cores: f64, period: Duration) -> anyhow::Result<CpuLimit> {
        if !(cores > 0.0) || period < Duration::from_millis(1) || period > Duration::from_secs(1) {
            bail!("a CPU limit needs more than 0 cores ({cores}) and a period from 1 ms to 1 s ({period:?})");
        }
        let quota_us = ((period.as_micros() as f64) * cores).round().max(1000.0) as u64;
        let period_us = period.as_micros() as u64;
        let v1 = PathBuf::from("/sys/fs/cgroup/cpu");
        let v2 = PathBuf::from("/sys/fs/cgroup");
        let dir = if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(format!("zerodrop-e2e-{name}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {} (needs root)", dir.display()))?;
            std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
            dir
        } else if std::fs::read_to_string(v2.join("cgroup.controllers")).is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu")) {
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+cpu");
            let dir = v2.join(format!("zerodrop-e2e-{name}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {} (needs root)", dir.display()))?;
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}"))?;
            dir
        } else {
            bail!("no cgroup cpu controller at /sys/fs/cgroup/cpu (v1) or in /sys/fs/cgroup/cgroup.controllers (v2)");
        };
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).with_context(|| format!("moving process {pid} into {}", dir.display()))?;
        Ok(CpuLimit { dir })
    }

    /// How many periods the limit throttled the process in so far.
    pub fn throttled_periods(&self) -> u64 {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")?.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // Empty once its process has exited; a cgroup that still holds one
        // stays (rmdir refuses), which the next run's mkdir reuses.
        let _ = std::fs::remove_dir(&self.dir);
    }
}
