//! One thread serves many sources. A worker waits on one epoll set holding
//! every socket of its sources (level-triggered), reads each readable socket
//! a bounded number of batches per turn so a busy source cannot starve the
//! others, and runs each source's timers when they fall due. No thread per
//! stream: the supervisor runs one worker per core and places sources on the
//! least loaded one.
//!
//! Under overload the kernel sheds what the sockets cannot hold (counted per
//! socket, see `kernel_drops`); the loop itself never blocks on one source.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::SourceConfig;
use crate::metrics::{SecondsCounter, StreamMetrics};
use crate::ingest::rtp_udp::{SocketRole, UdpSource};
use crate::stream::{BATCH, Finishing, StreamOptions, StreamReport};
use crate::ingest::udp::RecvBatch;

/// Batches one socket may read per turn before others get theirs.
const BATCHES_PER_TURN: usize = 8;
/// epoll user data of the command wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
const MAX_EVENTS: usize = 64;

struct Slot {
    source: UdpSource,
    id: String,
    generation: u64,
    wake_at: Instant,
}

/// The event loop of one thread: many sources, one epoll set.
pub struct Worker {
    epoll: OwnedFd,
    slots: Vec<Option<Slot>>,
    batch: RecvBatch,
    events: Vec<libc::epoll_event>,
    /// Where the time spent on packets and timers (not waiting) is counted:
    /// the capacity signal of the control policy.
    busy: Option<SecondsCounter>,
}

/// Runs one source on the calling thread until `stop` is set; returns its
/// final report (tests and tools; the supervisor runs workers shared by many
/// sources).
pub fn run_one(
    cfg: SourceConfig,
    metrics: StreamMetrics,
    stop: Arc<std::sync::atomic::AtomicBool>,
    options: StreamOptions,
) -> anyhow::Result<StreamReport> {
    let mut worker = Worker::new()?;
    let id = cfg.id();
    worker.add(UdpSource::open(cfg, metrics, &options)?, id, 0)?;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        worker.turn(Duration::from_millis(100))?;
    }
    Ok(worker.take_all().pop().map(|(_, _, f)| f.complete()).expect("one source was added"))
}

/// epoll user data: the slot, and the socket's role in the low 8 bits.
fn token(slot: usize, role: SocketRole) -> u64 {
    let role = match role {
        SocketRole::Rtp => 0,
        SocketRole::Rtcp => 1,
        SocketRole::Fec(i) => 2 + i as u64,
        SocketRole::Restream => 0xff,
    };
    (slot as u64) << 8 | role
}

fn untoken(t: u64) -> (usize, SocketRole) {
    let role = match t & 0xff {
        0 => SocketRole::Rtp,
        1 => SocketRole::Rtcp,
        0xff => SocketRole::Restream,
        r => SocketRole::Fec((r - 2) as u8),
    };
    ((t >> 8) as usize, role)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

impl Worker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let epoll = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        Ok(Self {
            epoll,
            slots: Vec::new(),
            batch: RecvBatch::new(BATCH),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS],
            busy: None,
        })
    }

    /// Counts the time this worker spends working (from epoll's return to
    /// the end of the turn) into `counter`.
    pub fn count_busy_time(&mut self, counter: SecondsCounter) {
        self.busy = Some(counter);
    }

    fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: valid epoll fd, valid fd, event struct lives across the call.
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    fn unwatch(&self, fd: RawFd) {
        // SAFETY: as above; a missing fd only yields an error we ignore.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Sources served.
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts serving an opened source.
    pub fn add(&mut self, source: UdpSource, id: String, generation: u64) -> io::Result<()> {
        let index = self.slots.iter().position(Option::is_none).unwrap_or(self.slots.len());
        let sockets: Vec<_> = source.sockets().collect();
        for (n, &(fd, role)) in sockets.iter().enumerate() {
            if let Err(e) = self.watch(fd, token(index, role)) {
                for &(fd, _) in &sockets[..n] {
                    self.unwatch(fd);
                }
                return Err(e);
            }
        }
        let slot = Slot { wake_at: Instant::now(), source, id, generation };
        if index == self.slots.len() {
            self.slots.push(Some(slot));
        } else {
            self.slots[index] = Some(slot);
        }
        Ok(())
    }

    /// Stops serving one source and returns it, drained, for its report.
    pub fn remove(&mut self, id: &str, generation: u64) -> Option<Finishing> {
        let index = self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.id == id && s.generation == generation))?;
        let slot = self.slots[index].take()?;
        for (fd, _) in slot.source.sockets() {
            self.unwatch(fd);
        }
        Some(slot.source.finish())
    }

    /// Asks source `id`'s sender for at most `bitrate_bps` (TMMBR or REMB;
    /// `ladder_top`: the top of its ladder), at its next turn. False when no
    /// such source is served here.
    pub fn request_bitrate(&mut self, id: &str, bitrate_bps: u64, ladder_top: bool) -> bool {
        let Some(slot) = self.slots.iter_mut().flatten().find(|s| s.id == id) else { return false };
        slot.source.request_bitrate(bitrate_bps, ladder_top);
        slot.wake_at = Instant::now();
        true
    }

    /// Turns decoding of source `id` on or off at once (a rendition switch);
    /// its timers run at the next turn, so a keyframe request goes out then.
    /// False when no such source is served here.
    pub fn set_decoding(&mut self, id: &str, on: bool) -> bool {
        let Some(slot) = self.slots.iter_mut().flatten().find(|s| s.id == id) else { return false };
        slot.source.set_decoding(on);
        slot.wake_at = Instant::now();
        true
    }

    /// Stops serving every source.
    pub fn take_all(&mut self) -> Vec<(String, u64, Finishing)> {
        let ids: Vec<(String, u64)> = self.slots.iter().flatten().map(|s| (s.id.clone(), s.generation)).collect();
        ids.into_iter().filter_map(|(id, g)| self.remove(&id, g).map(|f| (id, g, f))).collect()
    }

    /// One turn: wait until a socket is readable, a timer is due or `max_wait`
    /// passes; serve the readable sockets; run due timers. Returns whether an
    /// extra fd (`extra`, registered by the caller with `WAKE_TOKEN`) fired.
    pub fn turn(&mut self, max_wait: Duration) -> io::Result<bool> {
        let now = Instant::now();
        let mut wake = now + max_wait;
        for s in self.slots.iter().flatten() {
            wake = wake.min(s.wake_at);
        }
        // Round up: waking a little late is harmless, early means a spin.
        let ms = wake.saturating_duration_since(now).as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: the events buffer holds MAX_EVENTS entries for the call.
        let n = unsafe {
            libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), MAX_EVENTS as libc::c_int, ms)
        };
        let n = match cvt(n) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let working_since = self.busy.as_ref().map(|_| Instant::now());
        let mut woken = false;
        for i in 0..n {
            let t = self.events[i].u64;
            if t == WAKE_TOKEN {
                woken = true;
                continue;
            }
            let (index, role) = untoken(t);
            let Some(Some(slot)) = self.slots.get_mut(index) else { continue };
            if let Err(e) = slot.source.on_readable(role, &mut self.batch, BATCHES_PER_TURN) {
                // A socket error (ICMP unreachable reported late, ...) must
                // not take down the other sources on this thread.
                tracing::debug!(stream = %slot.id, error = %e, "receive error");
            }
            // Served now: its timers run below.
            slot.wake_at = now;
        }
        let now = Instant::now();
        for slot in self.slots.iter_mut().flatten() {
            if now >= slot.wake_at {
                slot.source.on_timers(now);
                slot.wake_at = slot.source.next_wake(now);
            }
        }
        if let (Some(busy), Some(since)) = (&self.busy, working_since) {
            busy.inc_by(since.elapsed().as_secs_f64());
        }
        Ok(woken)
    }
}

/// What a worker thread is told to do.
#[allow(clippy::large_enum_variant, reason = "a few per source lifetime, not per packet")]
enum Command {
    Start { cfg: Box<SourceConfig>, metrics: StreamMetrics, options: StreamOptions, generation: u64 },
    Stop { id: String, generation: u64 },
    RequestBitrate { id: String, bitrate_bps: u64, ladder_top: bool },
    SetDecoding { id: String, on: bool },
    Exit,
}

/// A source's end: its id, generation and report (or why it failed).
pub type Done = (String, u64, anyhow::Result<StreamReport>);

/// A worker running on a thread of its own, told what to serve through a
/// channel and an eventfd that wakes its epoll wait.
pub struct WorkerThread {
    commands: crossbeam_channel::Sender<Command>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    /// Sources placed on it (the supervisor's count, for placement).
    pub load: usize,
    /// Its busy-time counter.
    pub busy: SecondsCounter,
}

impl WorkerThread {
    pub fn spawn(name: String, busy: SecondsCounter, done: crossbeam_channel::Sender<Done>) -> io::Result<Self> {
        let mut worker = Worker::new()?;
        worker.count_busy_time(busy.clone());
        // SAFETY: plain syscall; the fd is owned from here on.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(cvt(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?) });
        worker.watch(wake.as_raw_fd(), WAKE_TOKEN)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || serve(worker, rx, thread_wake, done))?;
        Ok(Self { commands: tx, wake, thread: Some(thread), load: 0, busy })
    }

    fn send(&self, command: Command) {
        let _ = self.commands.send(command);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn start(&self, cfg: SourceConfig, metrics: StreamMetrics, options: StreamOptions, generation: u64) {
        self.send(Command::Start { cfg: Box::new(cfg), metrics, options, generation });
    }

    /// Asks source `id`'s sender for at most `bitrate_bps` (TMMBR or REMB).
    pub fn request_bitrate(&self, id: String, bitrate_bps: u64, ladder_top: bool) {
        self.send(Command::RequestBitrate { id, bitrate_bps, ladder_top });
    }

    /// Turns decoding of source `id` on or off (a rendition switch).
    pub fn set_decoding(&self, id: String, on: bool) {
        self.send(Command::SetDecoding { id, on });
    }

    /// Asks for one source to stop; its report arrives on the done channel.
    pub fn stop(&self, id: String, generation: u64) {
        self.send(Command::Stop { id, generation });
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        self.send(Command::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut worker: Worker, commands: crossbeam_channel::Receiver<Command>, wake: Arc<OwnedFd>, done: crossbeam_channel::Sender<Done>) {
    let report = |id: String, generation: u64, finishing: Finishing| {
        if finishing.has_decoder() {
            // A decoder drains for up to seconds: not on the receive thread.
            let spawned = std::thread::Builder::new()
                .name(format!("drain-{id}"))
                .spawn({
                    let (id, done) = (id.clone(), done.clone());
                    move || {
                        let _ = done.send((id, generation, Ok(finishing.complete())));
                    }
                });
            if let Err(e) = spawned {
                let _ = done.send((id, generation, Err(anyhow::anyhow!("cannot start a drain thread: {e}"))));
            }
        } else {
            let _ = done.send((id, generation, Ok(finishing.complete())));
        }
    };
    loop {
        let woken = match worker.turn(Duration::from_millis(100)) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "worker event loop failed");
                for (id, g, f) in worker.take_all() {
                    report(id, g, f);
                }
                return;
            }
        };
        if !woken {
            continue;
        }
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes into a live buffer resets the eventfd.
        unsafe { libc::read(wake.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Start { cfg, metrics, options, generation } => {
                    let id = cfg.id();
                    match UdpSource::open(*cfg, metrics, &options).and_then(|r| Ok(worker.add(r, id.clone(), generation)?)) {
                        Ok(()) => {}
                        Err(e) => {
                            let _ = done.send((id, generation, Err(e)));
                        }
                    }
                }
                Command::Stop { id, generation } => {
                    if let Some(f) = worker.remove(&id, generation) {
                        report(id, generation, f);
                    }
                }
                Command::RequestBitrate { id, bitrate_bps, ladder_top } => {
                    if !worker.request_bitrate(&id, bitrate_bps, ladder_top) {
                        tracing::debug!(stream = %id, "bit rate request for a source not served here");
                    }
                }
                Command::SetDecoding { id, on } => {
                    if !worker.set_decoding(&id, on) {
                        tracing::debug!(stream = %id, "rendition switch for a source not served here");
                    }
                }
                Command::Exit => {
                    for (id, g, f) in worker.take_all() {
                        report(id, g, f);
                    }
                    return;
                }
            }
        }
    }
}
