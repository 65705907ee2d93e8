//! Keeps one receiver thread per source and makes the running set match a
//! desired set: new sources start, changed ones restart, removed ones drain
//! and stop, and untouched ones keep running. The local runner applies one
//! set; the pod applies a new set each time its rendered config changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::SourceConfig;
use crate::metrics::{Metrics, Readiness, StreamMetrics};
use crate::receiver::{self, ReceiverOptions, StreamReport};

#[derive(Debug, Clone, Default)]
pub struct SupervisorOptions {
    pub au_log_dir: Option<PathBuf>,
    pub no_decode: bool,
}

/// What `apply` did, by source id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub stopped: Vec<String>,
    pub unchanged: Vec<String>,
}

struct Running {
    cfg: SourceConfig,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
    generation: u64,
}

type Done = (String, u64, anyhow::Result<StreamReport>);

pub struct Supervisor {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    options: SupervisorOptions,
    running: BTreeMap<String, Running>,
    done_tx: crossbeam_channel::Sender<Done>,
    done_rx: crossbeam_channel::Receiver<Done>,
    generation: u64,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>, readiness: Arc<Readiness>, options: SupervisorOptions) -> Self {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        Self { metrics, readiness, options, running: BTreeMap::new(), done_tx, done_rx, generation: 0 }
    }

    /// Metric handles of the running sources, in id order.
    pub fn streams(&self) -> Vec<StreamMetrics> {
        self.running.values().map(|r| self.metrics.stream(&r.cfg.pipeline, &r.cfg.name)).collect()
    }

    /// Each running source's metrics and the UDP sockets it binds.
    pub fn sockets(&self) -> Vec<(StreamMetrics, Vec<std::net::SocketAddr>)> {
        self.running
            .values()
            .map(|r| {
                let mut s = vec![r.cfg.rtp_bind];
                s.extend(r.cfg.rtcp_bind);
                (self.metrics.stream(&r.cfg.pipeline, &r.cfg.name), s)
            })
            .collect()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Makes the running set equal `desired`. A changed source is stopped
    /// (drained, socket closed) before its replacement binds the port.
    pub fn apply(&mut self, desired: &[SourceConfig]) -> (Change, Vec<(String, anyhow::Result<StreamReport>)>) {
        let mut change = Change::default();
        let mut ended = Vec::new();
        self.readiness.set_expected(desired.iter().map(SourceConfig::id));
        let wanted: BTreeMap<String, &SourceConfig> = desired.iter().map(|c| (c.id(), c)).collect();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(id, r)| wanted.get(*id).is_none_or(|c| **c != r.cfg))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(r) = self.running.remove(&id) {
                ended.push((id.clone(), self.stop_one(r)));
                if wanted.contains_key(&id) {
                    change.restarted.push(id);
                } else {
                    change.stopped.push(id);
                }
            }
        }
        for (id, cfg) in wanted {
            if self.running.contains_key(&id) {
                if !change.restarted.contains(&id) {
                    change.unchanged.push(id);
                }
                continue;
            }
            self.start(cfg.clone());
            if !change.restarted.contains(&id) {
                change.started.push(id);
            }
        }
        (change, ended)
    }

    fn start(&mut self, cfg: SourceConfig) {
        self.generation += 1;
        let generation = self.generation;
        let id = cfg.id();
        let metrics = self.metrics.stream(&cfg.pipeline, &cfg.name);
        let options = ReceiverOptions {
            au_log: self.options.au_log_dir.as_ref().map(|d| d.join(format!("{}.{}.au", cfg.pipeline, cfg.name))),
            no_decode: self.options.no_decode,
            readiness: Some(self.readiness.clone()),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_cfg, thread_stop, done_tx, thread_id) = (cfg.clone(), stop.clone(), self.done_tx.clone(), id.clone());
        let spawned = std::thread::Builder::new().name(format!("rx-{}", cfg.name)).spawn(move || {
            let result = receiver::run(thread_cfg, metrics, thread_stop, options);
            let _ = done_tx.send((thread_id, generation, result));
        });
        match spawned {
            Ok(handle) => {
                self.running.insert(id, Running { cfg, stop, handle, generation });
            }
            Err(e) => {
                let _ = self.done_tx.send((id, generation, Err(anyhow::anyhow!("cannot start a receiver thread: {e}"))));
            }
        }
    }

    /// Stops one receiver and waits for its report.
    fn stop_one(&mut self, r: Running) -> anyhow::Result<StreamReport> {
        r.stop.store(true, Ordering::Relaxed);
        let _ = r.handle.join();
        let id = r.cfg.id();
        self.readiness.mark_gone(&id);
        // Its result is in the channel; other receivers' results may be ahead of it.
        let mut result = None;
        let mut others = Vec::new();
        while let Ok(done) = self.done_rx.try_recv() {
            if done.0 == id && done.1 == r.generation {
                result = Some(done.2);
            } else {
                others.push(done);
            }
        }
        for d in others {
            let _ = self.done_tx.send(d);
        }
        result.unwrap_or_else(|| Err(anyhow::anyhow!("{id}: receiver ended without a report")))
    }

    /// Waits up to `timeout` for a receiver that ended by itself (an error:
    /// a port taken, a decoder missing). Returns its id and result.
    pub fn wait_ended(&mut self, timeout: Duration) -> Option<(String, anyhow::Result<StreamReport>)> {
        let (id, generation, result) = self.done_rx.recv_timeout(timeout).ok()?;
        match self.running.get(&id) {
            Some(r) if r.generation == generation => {
                if let Some(r) = self.running.remove(&id) {
                    let _ = r.handle.join();
                }
                self.readiness.mark_gone(&id);
                Some((id, result))
            }
            // A stale result of a receiver already replaced.
            _ => None,
        }
    }

    /// Stops every receiver (they drain in parallel) and returns their reports.
    pub fn stop_all(&mut self) -> Vec<(String, anyhow::Result<StreamReport>)> {
        for r in self.running.values() {
            r.stop.store(true, Ordering::Relaxed);
        }
        let running = std::mem::take(&mut self.running);
        let mut generations = BTreeMap::new();
        for (id, r) in running {
            let _ = r.handle.join();
            self.readiness.mark_gone(&id);
            generations.insert(id, r.generation);
        }
        let mut out = Vec::new();
        while let Ok((id, generation, result)) = self.done_rx.try_recv() {
            if generations.get(&id) == Some(&generation) {
                out.push((id, result));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
