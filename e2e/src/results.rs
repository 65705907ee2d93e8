//! What every benchmark results file records about how it was made, shared by
//! `bench-repair` and `bench-throughput`: the git commit and whether the tree
//! was clean (and what was dirty), the load average at start and end, the
//! machine (CPU model, cores, kernel, GStreamer), the command line as typed,
//! and timestamps.
//!
//! A benchmark that will write results refuses to start on a dirty tree
//! unless given `--allow-dirty` ([`ResultsMeta::start`]): figures must match a
//! commit. Files the benchmarks themselves write (anything under `results/`,
//! and `BENCHMARKS.md`) do not make the tree dirty for this purpose, so one
//! benchmark can follow another before the results are committed; they are
//! listed apart (`outputs_modified`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// The workspace root (the parent of the `e2e` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e lies in the workspace").to_path_buf()
}

fn command_output(cmd: &str, args: &[&str], dir: &Path) -> Option<String> {
    let out = Command::new(cmd).args(args).current_dir(dir).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// `/proc/loadavg`, trimmed.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Whole seconds: the data plane's RFC 3339 writer, without the millis.
    zerodrop_dataplane::session::clock::rfc3339(secs as f64).replace(".000Z", "Z")
}

/// The machine: CPU model, cores, kernel, GStreamer version, receive buffer
/// limit, scheduler autogroup; `summary` is one line of it.
pub fn machine_info() -> serde_json::Value {
    gstreamer::init().ok();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    let gst_version = gstreamer::version_string().to_string();
    // With autogroup scheduling, nice values only rank tasks within their
    // session: how this session's group is weighted against others matters.
    let autogroup = std::fs::read_to_string("/proc/self/autogroup").unwrap_or_default().trim().to_string();
    let boosted = autogroup.rsplit(' ').next().is_some_and(|n| n != "0");
    let summary = format!(
        "{nproc} CPU(s) {cpu}, Linux {kernel}, {gst_version}{}",
        if boosted { format!(", benchmark's scheduler autogroup at {}", autogroup.split_once(' ').map_or("", |x| x.1)) } else { String::new() }
    );
    serde_json::json!({
        "summary": summary,
        "nproc": nproc,
        "cpu": cpu,
        "kernel": kernel,
        "gstreamer": gst_version,
        "rmem_max": std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap_or_default().trim(),
        "autogroup": autogroup,
    })
}

/// The git state of the tree.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GitState {
    /// `git rev-parse HEAD` (empty when not a git checkout).
    pub commit: String,
    /// No modified, added, deleted or untracked file outside the benchmarks'
    /// own outputs.
    pub clean: bool,
    /// `git status --porcelain` lines that make the tree dirty.
    pub dirty: Vec<String>,
    /// `git status --porcelain` lines of the benchmarks' own outputs.
    pub outputs_modified: Vec<String>,
}

/// Whether a porcelain path is one the benchmarks write.
fn is_bench_output(path: &str) -> bool {
    let path = path.trim_matches('"');
    path == "BENCHMARKS.md" || path.starts_with("results/")
}

impl GitState {
    pub fn read(root: &Path) -> Self {
        let commit = command_output("git", &["rev-parse", "HEAD"], root).unwrap_or_default();
        let status = command_output("git", &["status", "--porcelain"], root);
        let (mut dirty, mut outputs_modified) = (Vec::new(), Vec::new());
        match status {
            Some(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    // `XY path` or `XY old -> new`.
                    let path = line.get(3..).unwrap_or("").rsplit(" -> ").next().unwrap_or("");
                    if is_bench_output(path) { outputs_modified.push(line.to_string()) } else { dirty.push(line.to_string()) }
                }
            }
            None => dirty.push("(git status failed: not a git checkout?)".to_string()),
        }
        GitState { commit, clean: dirty.is_empty(), dirty, outputs_modified }
    }

    /// `abc1234 (clean tree)` or `abc1234 (dirty tree: 3 paths)`.
    pub fn describe(&self) -> String {
        let short = self.commit.get(..12).unwrap_or(&self.commit);
        if self.clean { format!("{short} (clean tree)") } else { format!("{short} (dirty tree: {} path(s))", self.dirty.len()) }
    }
}

/// The command line as typed, shell-quoted where needed.
pub fn invocation() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Provenance of one benchmark run, taken at its start.
pub struct ResultsMeta {
    root: PathBuf,
    started: Instant,
    started_at: String,
    loadavg_at_start: String,
    git: GitState,
    machine: serde_json::Value,
    allow_dirty: bool,
}

impl ResultsMeta {
    /// Records the state at the start. When the run will write results
    /// (`writes_results`) and the tree is dirty, refuses unless
    /// `allow_dirty`, naming what is dirty.
    pub fn start(bench: &str, root: &Path, writes_results: bool, allow_dirty: bool) -> anyhow::Result<Self> {
        let git = GitState::read(root);
        if writes_results && !git.clean && !allow_dirty {
            let mut list = git.dirty.iter().take(20).map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n");
            if git.dirty.len() > 20 {
                list.push_str(&format!("\n  … and {} more", git.dirty.len() - 20));
            }
            anyhow::bail!(
                "{bench}: the working tree is dirty, so its results would not match commit {}:\n{list}\n\
                 Commit (or set aside) these changes first, or pass --allow-dirty to write results marked as \
                 coming from a dirty tree.",
                git.commit
            );
        }
        if !git.clean {
            eprintln!("{bench}: warning: dirty tree ({} path(s)); results are marked so", git.dirty.len());
        }
        Ok(Self {
            root: root.to_path_buf(),
            started: Instant::now(),
            started_at: utc_now(),
            loadavg_at_start: loadavg(),
            git,
            machine: machine_info(),
            allow_dirty,
        })
    }

    pub fn machine(&self) -> &serde_json::Value {
        &self.machine
    }

    pub fn machine_summary(&self) -> &str {
        self.machine["summary"].as_str().unwrap_or("")
    }

    pub fn git(&self) -> &GitState {
        &self.git
    }

    pub fn loadavg_at_start(&self) -> &str {
        &self.loadavg_at_start
    }

    pub fn started_at(&self) -> &str {
        &self.started_at
    }

    /// The provenance block of a results file, read now: the end's load
    /// average and git state next to the start's.
    pub fn to_json(&self) -> serde_json::Value {
        let end = GitState::read(&self.root);
        serde_json::json!({
            "git_commit": self.git.commit,
            "tree_clean": self.git.clean,
            "dirty_paths": self.git.dirty,
            "bench_outputs_modified": self.git.outputs_modified,
            "allow_dirty": self.allow_dirty,
            "git_at_end": { "commit": end.commit, "tree_clean": end.clean, "dirty_paths": end.dirty },
            "command_line": invocation(),
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "wall_s": self.started.elapsed().as_secs_f64(),
            "loadavg_at_start": self.loadavg_at_start,
            "loadavg_at_end": loadavg(),
            "machine": self.machine,
        })
    }

    /// Two markdown lines: machine, then commit/tree/date/load.
    pub fn markdown_lines(&self) -> String {
        format!(
            "Machine: {}  \nCommit: `{}`, {}; started {}; load average at start {}, at end {}\n",
            self.machine_summary(),
            self.git.commit,
            if self.git.clean {
                "clean tree".to_string()
            } else {
                format!("**dirty tree** ({})", self.git.dirty.iter().map(|l| l.trim()).collect::<Vec<_>>().join(", "))
            },
            self.started_at,
            self.loadavg_at_start,
            loadavg(),
        )
    }
}

/// Replaces the text between `begin` and `end` in `path` (appending the
/// markers if missing), so the hand-written text around them stays.
pub fn update_markdown(path: &Path, begin: &str, end: &str, section: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{begin}\n{section}{end}");
    let new = match (text.find(begin), text.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{text}{}{block}\n", if text.is_empty() { "" } else { "\n" }),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

/// Writes `json` pretty-printed to `path`, creating its directory.
pub fn write_json(path: &Path, json: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(json)? + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_now_looks_like_iso8601() {
        let s = utc_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T", "{s}");
    }

    #[test]
    fn bench_outputs_do_not_count_as_dirty() {
        assert!(is_bench_output("results/repair-benchmark.json"));
        assert!(is_bench_output("BENCHMARKS.md"));
        assert!(!is_bench_output("e2e/src/results.rs"));
        assert!(!is_bench_output("docs/BENCHMARKS.md"));
    }
}
