//! Places sources on worker threads (one per core by default, each serving
//! many sources; see `worker`) and makes the running set match a desired
//! set: new sources start, changed ones restart, removed ones drain and stop,
//! and untouched ones keep running. The local runner applies one set; the pod
//! applies a new set each time its rendered config changes.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::SourceConfig;
use crate::metrics::{Metrics, Readiness, StreamMetrics};
use crate::stream::{StreamOptions, StreamReport};
use crate::ingest::worker::{Done, WorkerThread};

#[derive(Debug, Clone, Default)]
pub struct SupervisorOptions {
    pub au_log_dir: Option<PathBuf>,
    pub no_decode: bool,
    /// Receive threads; 0 means one per available core.
    pub workers: usize,
    /// Where sources' outputs publish what the process's HTTP server
    /// serves (HLS, thumbnails).
    pub published: Option<Arc<crate::output::Published>>,
}

/// How long stopping waits for a receiver's report (its decoder drains for
/// at most 5 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

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
    worker: usize,
    generation: u64,
}

pub struct Supervisor {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    options: SupervisorOptions,
    running: BTreeMap<String, Running>,
    workers: Vec<WorkerThread>,
    done_tx: crossbeam_channel::Sender<Done>,
    done_rx: crossbeam_channel::Receiver<Done>,
    /// Reports received while waiting for another one.
    backlog: VecDeque<Done>,
    /// Sources told to decode or not (rendition switches), by id: a source
    /// restarted (its settings changed) keeps what it was told.
    decoding: BTreeMap<String, bool>,
    generation: u64,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>, readiness: Arc<Readiness>, options: SupervisorOptions) -> Self {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        Self {
            metrics,
            readiness,
            options,
            running: BTreeMap::new(),
            workers: Vec::new(),
            done_tx,
            done_rx,
            backlog: VecDeque::new(),
            decoding: BTreeMap::new(),
            generation: 0,
        }
    }

    /// The worker with the fewest sources; workers start on first use.
    fn place(&mut self) -> anyhow::Result<usize> {
        let wanted = match self.options.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        if self.workers.len() < wanted && self.workers.iter().all(|w| w.load > 0) {
            let name = format!("rx-worker-{}", self.workers.len());
            let busy = self.metrics.worker_busy(self.workers.len());
            self.workers.push(WorkerThread::spawn(name, busy, self.done_tx.clone())?);
        }
        let (index, _) = self.workers.iter().enumerate().min_by_key(|(_, w)| w.load).expect("at least one worker");
        Ok(index)
    }

    /// Metric handles of the running sources, in id order.
    pub fn streams(&self) -> Vec<StreamMetrics> {
        self.running.values().map(|r| self.metrics.stream(&r.cfg.pipeline, &r.cfg.name)).collect()
    }

    /// Each running source's metrics and the UDP sockets it binds.
    pub fn sockets(&self) -> Vec<(StreamMetrics, Vec<std::net::SocketAddr>)> {
        self.running
            .values()
            .map(|r| (self.metrics.stream(&r.cfg.pipeline, &r.cfg.name), r.cfg.sockets()))
            .collect()
    }

    /// Seconds each worker thread has spent working so far (see
    /// `Worker::count_busy_time`), by worker.
    pub fn busy_seconds(&self) -> Vec<f64> {
        self.workers.iter().map(|w| w.busy.get()).collect()
    }

    /// The metrics the sources report into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Asks the sender of running source `id` (`pipeline/name`) for at most
    /// `bitrate_bps` (RTCP TMMBR or REMB, as the source's `bitrateRequest`
    /// says; `ladder_top`: the top of its ladder). False when no such source
    /// runs.
    pub fn request_bitrate(&self, id: &str, bitrate_bps: u64, ladder_top: bool) -> bool {
        let Some(r) = self.running.get(id) else { return false };
        self.workers[r.worker].request_bitrate(id.to_string(), bitrate_bps, ladder_top);
        true
    }

    /// Turns decoding of source `id` (`pipeline/name`) on or off without
    /// restarting it: a rendition group decodes one member at a time. Kept
    /// for a source not running yet or restarted later. False when no such
    /// source runs now.
    pub fn set_decoding(&mut self, id: &str, on: bool) -> bool {
        self.decoding.insert(id.to_string(), on);
        let Some(r) = self.running.get(id) else { return false };
        self.workers[r.worker].set_decoding(id.to_string(), on);
        true
    }

    /// What source `id` was last told by [`Supervisor::set_decoding`], if
    /// anything.
    pub fn told_decoding(&self, id: &str) -> Option<bool> {
        self.decoding.get(id).copied()
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
        self.decoding.retain(|id, _| wanted.contains_key(id));
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
        let worker = match self.place() {
            Ok(w) => w,
            Err(e) => {
                self.backlog.push_back((id, generation, Err(e.context("cannot start a receive thread"))));
                return;
            }
        };
        let metrics = self.metrics.stream(&cfg.pipeline, &cfg.name);
        let options = StreamOptions {
            au_log: self.options.au_log_dir.as_ref().map(|d| d.join(format!("{}.{}.au", cfg.pipeline, cfg.name))),
            recovered_log: self.options.au_log_dir.as_ref().and_then(|d| {
                cfg.fec.is_some().then(|| d.join(format!("{}.{}.recovered", cfg.pipeline, cfg.name)))
            }),
            no_decode: self.options.no_decode,
            readiness: Some(self.readiness.clone()),
            published: self.options.published.clone(),
            // A lower rendition starts received only, unless switched on.
            inactive_rendition: !self.decoding.get(&id).copied().unwrap_or(cfg.rendition_of.is_none()),
        };
        self.workers[worker].start(cfg.clone(), metrics, options, generation);
        self.workers[worker].load += 1;
        self.running.insert(id, Running { cfg, worker, generation });
    }

    fn forget(&mut self, id: &str) -> Option<Running> {
        let r = self.running.remove(id)?;
        self.workers[r.worker].load -= 1;
        self.readiness.mark_gone(id);
        Some(r)
    }

    /// The next report, from the backlog first; None after `timeout`.
    fn next_done(&mut self, timeout: Duration) -> Option<Done> {
        self.backlog.pop_front().or_else(|| self.done_rx.recv_timeout(timeout).ok())
    }

    /// Waits for the reports of `wanted` (id → generation), keeping others
    /// for later.
    fn collect(&mut self, mut wanted: BTreeMap<String, u64>) -> Vec<(String, anyhow::Result<StreamReport>)> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut out = Vec::new();
        let mut others = Vec::new();
        // Backlog first, then the channel until every wanted report is in.
        while !wanted.is_empty() {
            let Some((id, generation, result)) = self
                .backlog
                .pop_front()
                .or_else(|| self.done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok())
            else {
                break;
            };
            if wanted.get(&id) == Some(&generation) {
                wanted.remove(&id);
                out.push((id, result));
            } else {
                others.push((id, generation, result));
            }
        }
        self.backlog.extend(others);
        for (id, _) in wanted {
            out.push((id.clone(), Err(anyhow::anyhow!("{id}: receiver did not report within {STOP_TIMEOUT:?}"))));
        }
        out
    }

    /// Stops one receiver and waits for its report.
    fn stop_one(&mut self, r: Running) -> anyhow::Result<StreamReport> {
        let id = r.cfg.id();
        self.workers[r.worker].load -= 1;
        self.readiness.mark_gone(&id);
        self.workers[r.worker].stop(id.clone(), r.generation);
        self.collect(BTreeMap::from([(id.clone(), r.generation)]))
            .pop()
            .map_or_else(|| Err(anyhow::anyhow!("{id}: receiver ended without a report")), |(_, r)| r)
    }

    /// Waits up to `timeout` for a receiver that ended by itself (an error:
    /// a port taken, a decoder missing). Returns its id and result.
    pub fn wait_ended(&mut self, timeout: Duration) -> Option<(String, anyhow::Result<StreamReport>)> {
        let (id, generation, result) = self.next_done(timeout)?;
        match self.running.get(&id) {
            Some(r) if r.generation == generation => {
                self.forget(&id);
                Some((id, result))
            }
            // A stale result of a receiver already replaced.
            _ => None,
        }
    }

    /// Stops every receiver (they drain in parallel) and returns their reports.
    pub fn stop_all(&mut self) -> Vec<(String, anyhow::Result<StreamReport>)> {
        let running = std::mem::take(&mut self.running);
        let mut wanted = BTreeMap::new();
        for (id, r) in running {
            self.workers[r.worker].load -= 1;
            self.readiness.mark_gone(&id);
            self.workers[r.worker].stop(id.clone(), r.generation);
            wanted.insert(id, r.generation);
        }
        let mut out = self.collect(wanted);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
