//! Loads `udp_drops.bpf.c`, fills its reason filter, attaches its raw
//! tracepoints and reads its per-CPU hash.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::BtfTracePoint;
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::{Btf, Ebpf, EbpfLoader};

use crate::layout::{self, DropKey, DropValue};
use crate::reasons::DropReasons;

const PROG_KFREE_SKB: &str = "zd_kfree_skb";
const PROG_UDP_FAIL: &str = "zd_udp_fail";
const PROG_UDP_FAIL_SK: &str = "zd_udp_fail_sk";
const PROG_NOOP: &str = "zd_noop";
const TP_KFREE_SKB: &str = "kfree_skb";
const TP_UDP_FAIL: &str = "udp_fail_queue_rcv_skb";

#[cfg(zerodrop_ebpf_object)]
fn object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp_drops.bpf.o")))
}

#[cfg(not(zerodrop_ebpf_object))]
fn object() -> Option<&'static [u8]> {
    None
}

/// Why the eBPF programs could not be used, in words for a log line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EbpfUnavailable(pub String);

/// One program's kernel statistics (`kernel.bpf_stats_enabled`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct EbpfDropCounter {
    bpf: Ebpf,
    reasons: DropReasons,
    udp_fail_prog: &'static str,
    links: Vec<(&'static str, BtfTracePointLinkId)>,
    noop_link: Option<BtfTracePointLinkId>,
}

impl std::fmt::Debug for EbpfDropCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfDropCounter")
            .field("udp_fail_prog", &self.udp_fail_prog)
            .field("attached", &self.links.len())
            .finish_non_exhaustive()
    }
}

impl EbpfDropCounter {
    /// Loads and attaches both programs.
    pub fn start() -> Result<Self, EbpfUnavailable> {
        let mut counter = Self::load()?;
        counter.attach()?;
        Ok(counter)
    }

    /// Loads the programs into the kernel without attaching them.
    pub fn load() -> Result<Self, EbpfUnavailable> {
        let object = object().ok_or_else(|| {
            EbpfUnavailable("this build has no eBPF object (built with ZERODROP_EBPF_SKIP_BUILD=1)".to_owned())
        })?;
        if !Path::new(crate::reasons::BTF_PATH).exists() {
            return Err(EbpfUnavailable(format!(
                "the kernel has no BTF ({} is missing; needs CONFIG_DEBUG_INFO_BTF=y), so the CO-RE programs cannot be relocated",
                crate::reasons::BTF_PATH
            )));
        }
        let reasons = DropReasons::load()
            .map_err(|err| EbpfUnavailable(format!("cannot resolve the kernel's drop reason names: {err}")))?;
        let reason = |name: &str| {
            reasons
                .value(name)
                .ok_or_else(|| EbpfUnavailable(format!("this kernel's enum skb_drop_reason has no {name}")))
        };
        let rcvbuff = reason("SOCKET_RCVBUFF")?;
        let proto_mem = reason("PROTO_MEM")?;

        let mut bpf = EbpfLoader::new().load(object).map_err(|err| explain("loading the eBPF object", &err))?;

        {
            let mut config: Array<&mut MapData, u32> = Array::try_from(map_mut(&mut bpf, "zd_config")?)
                .map_err(|err| explain("opening zd_config", &err))?;
            config
                .set(layout::CONFIG_REASON_RCVBUFF, rcvbuff, 0)
                .and_then(|()| config.set(layout::CONFIG_REASON_PROTO_MEM, proto_mem, 0))
                .map_err(|err| explain("writing zd_config", &err))?;
        }
        let mut counter = Self { bpf, reasons, udp_fail_prog: PROG_UDP_FAIL, links: Vec::new(), noop_link: None };
        let counted: Vec<u32> = counter
            .reasons
            .iter()
            .filter(|(_, name)| DropReasons::counted_by_default(name))
            .map(|(value, _)| value)
            .collect();
        counter.set_counted_reasons(&counted)?;

        let btf = Btf::from_sys_fs().map_err(|err| explain("reading the kernel BTF", &err))?;
        counter.load_program(PROG_KFREE_SKB, TP_KFREE_SKB, &btf)?;
        if let Err(with_skb) = counter.load_program(PROG_UDP_FAIL, TP_UDP_FAIL, &btf) {
            // Before 6.10 the tracepoint has no skb argument and the
            // verifier refuses a program that reads it.
            counter.load_program(PROG_UDP_FAIL_SK, TP_UDP_FAIL, &btf).map_err(|without| {
                EbpfUnavailable(format!("{with_skb}; and without the skb argument: {without}"))
            })?;
            counter.udp_fail_prog = PROG_UDP_FAIL_SK;
            // Nothing to match a kfree_skb against: let udp_fail alone
            // count receive-buffer and memory drops.
            let counted: Vec<u32> = counter
                .reasons
                .iter()
                .filter(|(_, name)| {
                    DropReasons::counted_by_default(name) && !matches!(*name, "SOCKET_RCVBUFF" | "PROTO_MEM")
                })
                .map(|(value, _)| value)
                .collect();
            counter.set_counted_reasons(&counted)?;
            tracing::info!("kernel before 6.10: udp_fail_queue_rcv_skb drops keyed by the socket's bound address");
        }
        Ok(counter)
    }

    fn program(&mut self, name: &str) -> Result<&mut BtfTracePoint, EbpfUnavailable> {
        self.bpf
            .program_mut(name)
            .ok_or_else(|| EbpfUnavailable(format!("program {name} missing from the eBPF object")))?
            .try_into()
            .map_err(|err| explain(name, &err))
    }

    fn load_program(&mut self, name: &str, tracepoint: &str, btf: &Btf) -> Result<(), EbpfUnavailable> {
        self.program(name)?
            .load(tracepoint, btf)
            .map_err(|err| explain(&format!("loading program {name} for tracepoint {tracepoint}"), &err))
    }

    /// Sets which `enum skb_drop_reason` values `kfree_skb` counts.
    pub fn set_counted_reasons(&mut self, values: &[u32]) -> Result<(), EbpfUnavailable> {
        let mut filter: Array<&mut MapData, u8> = Array::try_from(map_mut(&mut self.bpf, "zd_reasons")?)
            .map_err(|err| explain("opening zd_reasons", &err))?;
        for index in 0..layout::MAX_REASONS {
            let wanted = u8::from(values.contains(&index));
            filter.set(index, wanted, 0).map_err(|err| explain("writing zd_reasons", &err))?;
        }
        Ok(())
    }

    /// Attaches the programs (no-op when attached). `udp_fail_queue_rcv_skb`
    /// first, so a receive-buffer drop is never missed in between.
    pub fn attach(&mut self) -> Result<(), EbpfUnavailable> {
        if !self.links.is_empty() {
            return Ok(());
        }
        for prog in [self.udp_fail_prog, PROG_KFREE_SKB] {
            match self.program(prog)?.attach() {
                Ok(link) => self.links.push((prog, link)),
                Err(err) => {
                    let err = explain(&format!("attaching {prog}"), &err);
                    self.detach()?;
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Detaches the programs; the maps keep their counts.
    pub fn detach(&mut self) -> Result<(), EbpfUnavailable> {
        while let Some((prog, link)) = self.links.pop() {
            self.program(prog)?.detach(link).map_err(|err| explain(&format!("detaching {prog}"), &err))?;
        }
        Ok(())
    }

    /// Benchmark only: attaches an empty program to
    /// `udp_fail_queue_rcv_skb` (or detaches it), whose run time is what BPF
    /// statistics themselves charge to every run.
    #[doc(hidden)]
    pub fn set_noop_attached(&mut self, attached: bool) -> Result<(), EbpfUnavailable> {
        match (attached, self.noop_link.take()) {
            (true, None) => {
                let btf = Btf::from_sys_fs().map_err(|err| explain("reading the kernel BTF", &err))?;
                let program = self.program(PROG_NOOP)?;
                if program.fd().is_err() {
                    program.load(TP_UDP_FAIL, &btf).map_err(|err| explain("loading zd_noop", &err))?;
                }
                self.noop_link = Some(self.program(PROG_NOOP)?.attach().map_err(|err| explain("attaching zd_noop", &err))?);
            }
            (false, Some(link)) => {
                self.program(PROG_NOOP)?.detach(link).map_err(|err| explain("detaching zd_noop", &err))?;
            }
            (_, link) => self.noop_link = link,
        }
        Ok(())
    }

    pub fn is_attached(&self) -> bool {
        !self.links.is_empty()
    }

    pub fn reasons(&self) -> &DropReasons {
        &self.reasons
    }

    /// Cumulative packets per key, summed over CPUs and over the two hooks.
    pub fn read(&self) -> io::Result<BTreeMap<(std::net::SocketAddr, u32), u64>> {
        let map = self.bpf.map("zd_drops").ok_or_else(|| io::Error::other("map zd_drops missing"))?;
        let drops: PerCpuHashMap<&MapData, DropKey, DropValue> =
            PerCpuHashMap::try_from(map).map_err(io::Error::other)?;
        let mut totals = BTreeMap::new();
        for entry in drops.iter() {
            let (key, values) = entry.map_err(io::Error::other)?;
            let packets: u64 = values.iter().map(|v| v.packets).sum();
            let addr = std::net::SocketAddr::new(key.ip(), key.port);
            *totals.entry((addr, key.reason)).or_insert(0) += packets;
        }
        Ok(totals)
    }

    /// Drops not counted because `zd_drops` was full.
    pub fn uncounted_map_full(&self) -> io::Result<u64> {
        let map = self.bpf.map("zd_errors").ok_or_else(|| io::Error::other("map zd_errors missing"))?;
        let errors: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(io::Error::other)?;
        let values = errors.get(&layout::ERR_MAP_FULL, 0).map_err(io::Error::other)?;
        Ok(values.iter().sum())
    }

    /// Run time and run count of the attached programs; both stay 0 unless
    /// the kernel's BPF statistics are on (see [`enable_bpf_stats`]).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        [self.udp_fail_prog, PROG_KFREE_SKB, PROG_NOOP]
            .into_iter()
            .filter(|name| *name != PROG_NOOP || self.noop_link.is_some())
            .filter_map(|name| {
                let info = self.bpf.program(name)?.info().ok()?;
                Some(ProgramStats {
                    name: name.to_owned(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: info.run_count(),
                })
            })
            .collect()
    }
}

/// Turns on `run_time_ns`/`run_cnt` accounting for as long as the returned
/// fd lives (BPF_ENABLE_STATS; needs CAP_SYS_ADMIN).
pub fn enable_bpf_stats() -> io::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|err| io::Error::other(err.to_string()))
}

fn map_mut<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, EbpfUnavailable> {
    bpf.map_mut(name).ok_or_else(|| EbpfUnavailable(format!("map {name} missing from the eBPF object")))
}

/// Turns an aya error into a sentence, naming the missing privilege when
/// the kernel said EPERM.
fn explain(what: &str, err: &(dyn std::error::Error + 'static)) -> EbpfUnavailable {
    let mut chain = err.to_string();
    let mut permission = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            permission |= matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES));
        }
        if !std::ptr::eq(e, err) && !chain.contains(&e.to_string()) {
            chain.push_str(": ");
            chain.push_str(&e.to_string());
        }
        source = e.source();
    }
    if permission {
        EbpfUnavailable(format!(
            "{what}: not permitted ({chain}); the agent needs CAP_BPF and CAP_PERFMON (or root)"
        ))
    } else {
        EbpfUnavailable(format!("{what}: {chain}"))
    }
}
