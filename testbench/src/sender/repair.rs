//! The sender's RTCP side: answers NACKs with RTX (RFC 4588, SSRC-multiplexed)
//! from a history of sent packets, turns PLI/FIR into a forced keyframe, sends
//! sender reports so the receiver can measure RTT, reads the receiver's
//! report blocks for the RTT it measured back, and honours TMMBR (RFC 5104)
//! by changing the encoder's bit rate live, acknowledged with TMMBN, and REMB
//! (draft-alvestrand-rmcat-remb) the same way, unacknowledged, as a WebRTC
//! sender does.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;

use super::SendCounters;
use crate::loss::LossModel;
use zerodrop_dataplane::ingest::udp::{is_transient, send_to_waiting, wait_readable};
use zerodrop_dataplane::rtp::{self, RtcpEvent, RtpPacket};

/// The last `capacity` sent RTP packets, by sequence number.
pub struct PacketHistory {
    slots: Vec<Option<(u16, Vec<u8>)>>,
}

impl PacketHistory {
    pub fn new(capacity: usize) -> Self {
        Self { slots: (0..capacity.clamp(1, 65_536)).map(|_| None).collect() }
    }

    pub fn insert(&mut self, seq: u16, packet: &[u8]) {
        let n = self.slots.len();
        let slot = &mut self.slots[seq as usize % n];
        match slot {
            // Reuse the evicted packet's allocation.
            Some((s, bytes)) => {
                *s = seq;
                bytes.clear();
                bytes.extend_from_slice(packet);
            }
            None => *slot = Some((seq, packet.to_vec())),
        }
    }

    pub fn get(&self, seq: u16) -> Option<&[u8]> {
        match &self.slots[seq as usize % self.slots.len()] {
            Some((s, bytes)) if *s == seq => Some(bytes),
            _ => None,
        }
    }
}

/// State the send loop writes and the RTCP side reads.
pub(super) struct SendShared {
    pub history: PacketHistory,
    /// RTP timestamp of the latest frame and when its first packet left, to
    /// map wall-clock time to RTP time in sender reports.
    pub last_frame: Option<(u32, Instant)>,
    pub packet_count: u32,
    pub octet_count: u32,
}

pub(super) struct RtcpResponder {
    pub rtcp: UdpSocket,
    /// The RTP socket also receives RTCP from rtcp-mux or symmetric receivers,
    /// and carries RTX.
    pub rtp: UdpSocket,
    pub rtcp_mux: bool,
    pub dest: SocketAddr,
    pub rtcp_dest: SocketAddr,
    pub ssrc: u32,
    pub rtx_ssrc: u32,
    pub rtx_pt: u8,
    pub rtx_seq: u16,
    pub clock_rate: u32,
    pub cname: String,
    pub sr_interval: Duration,
    pub rtx_loss: LossModel,
    pub encoder: gst::Element,
    pub shared: Arc<Mutex<SendShared>>,
    pub counters: Arc<SendCounters>,
    pub stop: Arc<AtomicBool>,
    /// The last XR receiver reference time: (receiver SSRC, middle 32 bits
    /// of its NTP timestamp, when it came), echoed as DLRR in sender reports.
    pub last_rrtr: Option<(u32, u32, Instant)>,
    /// This sender's clock (the machine's unless `--clock-ppm`).
    pub wallclock: super::SenderWallclock,
    /// The encoder bit rate asked for on the command line (kbit/s): a TMMBR
    /// limits the rate below it, never raises it above.
    pub max_kbps: u32,
    pub mtu: u32,
}

/// The lowest encoder bit rate a TMMBR can bring us to (kbit/s).
const MIN_KBPS: u64 = 64;

impl RtcpResponder {
    pub fn run(mut self) {
        let mut buf = vec![0u8; 65_536];
        let mut events = Vec::new();
        let mut out = Vec::with_capacity(1500);
        let mut next_sr = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if Instant::now() >= next_sr {
                next_sr = Instant::now() + self.sr_interval;
                self.send_sender_report(&mut out, None, false);
            }
            let wait = next_sr.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
            let socks: Vec<&UdpSocket> = if self.rtcp_mux { vec![&self.rtp] } else { vec![&self.rtcp, &self.rtp] };
            let ready = match wait_readable(&socks, wait) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("sender RTCP poll failed: {e}");
                    return;
                }
            };
            for (i, is_ready) in ready.into_iter().enumerate() {
                if !is_ready {
                    continue;
                }
                for _ in 0..64 {
                    let sock = if self.rtcp_mux || i == 1 { &self.rtp } else { &self.rtcp };
                    let n = match sock.recv_from(&mut buf) {
                        Ok((n, _src)) => n,
                        Err(e) if is_transient(&e) => break,
                        Err(e) => {
                            tracing::warn!("sender RTCP receive failed: {e}");
                            break;
                        }
                    };
                    self.handle_datagram(&buf[..n], &mut events, &mut out);
                }
            }
        }
        // Leaving: a last report and a BYE (RFC 3550 6.6), so the receiver
        // knows nothing more will come (and closes what it publishes).
        self.send_sender_report(&mut out, None, true);
    }

    fn handle_datagram(&mut self, data: &[u8], events: &mut Vec<RtcpEvent>, out: &mut Vec<u8>) {
        let c = self.counters.clone();
        if !rtp::is_rtcp(data) {
            c.datagrams_ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        c.rtcp_received.fetch_add(1, Ordering::Relaxed);
        events.clear();
        if let Err(e) = rtp::parse_rtcp(data, events) {
            c.rtcp_malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("ignoring {e}");
            // Events parsed before the malformed part are still acted on.
        }
        for event in events.drain(..) {
            tracing::trace!(?event, "sender RTCP");
            match event {
                RtcpEvent::Nack { media_ssrc, seqs } if self.is_ours(media_ssrc) => {
                    c.nacks_received.fetch_add(1, Ordering::Relaxed);
                    for seq in seqs {
                        self.retransmit(seq, out);
                    }
                }
                RtcpEvent::Pli { media_ssrc } if self.is_ours(media_ssrc) => {
                    c.plis_received.fetch_add(1, Ordering::Relaxed);
                    self.force_keyframe();
                }
                RtcpEvent::Fir { media_ssrc } if self.is_ours(media_ssrc) => {
                    c.firs_received.fetch_add(1, Ordering::Relaxed);
                    self.force_keyframe();
                }
                RtcpEvent::ReportBlock { media_ssrc, lsr, dlsr, fraction_lost, .. } if media_ssrc == self.ssrc => {
                    c.last_fraction_lost.store(fraction_lost as u64, Ordering::Relaxed);
                    if lsr != 0 {
                        let now_mid = (rtp::ntp_timestamp(SystemTime::now()) >> 16) as u32;
                        let rtt = now_mid.wrapping_sub(lsr).wrapping_sub(dlsr);
                        tracing::trace!(now_mid, lsr, dlsr, rtt, "RTT from report block");
                        // A negative RTT (clock step) wraps to a huge value; skip it.
                        if rtt < 65_536 * 10 {
                            c.rtt_us.store(rtt as u64 * 1_000_000 / 65_536, Ordering::Relaxed);
                        }
                    }
                }
                RtcpEvent::Tmmbr { sender_ssrc, media_ssrc, bitrate_bps, overhead } if media_ssrc == self.ssrc => {
                    c.tmmbrs_received.fetch_add(1, Ordering::Relaxed);
                    self.limit_bitrate(sender_ssrc, bitrate_bps, overhead, out);
                }
                RtcpEvent::Remb { sender_ssrc, bitrate_bps, ssrcs } if ssrcs.contains(&self.ssrc) => {
                    c.rembs_received.fetch_add(1, Ordering::Relaxed);
                    self.follow_remb(sender_ssrc, bitrate_bps);
                }
                RtcpEvent::ReceiverReferenceTime { ssrc, ntp } => {
                    self.last_rrtr = Some((ssrc, (ntp >> 16) as u32, Instant::now()));
                }
                RtcpEvent::Nack { .. } | RtcpEvent::Pli { .. } | RtcpEvent::Fir { .. } => {
                    c.feedback_other_ssrc.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }

    /// Feedback addressed to our SSRC; 0 is accepted because some receivers
    /// leave the media SSRC unset before they have learned it.
    fn is_ours(&self, media_ssrc: u32) -> bool {
        media_ssrc == self.ssrc || media_ssrc == 0
    }

    fn retransmit(&mut self, seq: u16, out: &mut Vec<u8>) {
        let c = &self.counters;
        c.nacked_packets.fetch_add(1, Ordering::Relaxed);
        let built = {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            match shared.history.get(seq).map(RtpPacket::parse) {
                Some(Ok(original)) => rtp::write_rtx(&original, self.rtx_pt, self.rtx_ssrc, self.rtx_seq, out).is_ok(),
                _ => false,
            }
        };
        if !built {
            c.nack_unknown_seq.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.rtx_seq = self.rtx_seq.wrapping_add(1);
        c.rtx_sent.fetch_add(1, Ordering::Relaxed);
        if self.rtx_loss.should_drop() {
            c.rtx_dropped.fetch_add(1, Ordering::Relaxed);
        } else if send_to_waiting(&self.rtp, out, self.dest).is_err() {
            c.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_keyframe(&self) {
        if super::pipeline::force_keyframe(&self.encoder) {
            self.counters.keyframes_forced.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets the encoder to what a TMMBR allows and acknowledges it at once
    /// with a TMMBN (RFC 5104 §4.2.2). The request's figure counts every
    /// packet's overhead; the encoder's is payload only. A limit above the
    /// configured rate brings the encoder back to that rate, not beyond.
    fn limit_bitrate(&mut self, requester: u32, bitrate_bps: u64, overhead: u16, out: &mut Vec<u8>) {
        let packet = u64::from(self.mtu.max(1));
        let media_bps = bitrate_bps.saturating_mul(packet) / (packet + u64::from(overhead));
        if !self.set_encoder_bitrate(requester, bitrate_bps, media_bps, "TMMBR") {
            self.send_sender_report(out, None, false);
            return;
        }
        self.send_sender_report(out, Some((requester, bitrate_bps, overhead)), false);
    }

    /// Sets the encoder to a REMB's figure, as a WebRTC sender caps its
    /// target bit rate by it (REMB says nothing of packet overhead). Nothing
    /// answers a REMB; the receiver repeats it while it stands.
    fn follow_remb(&mut self, requester: u32, bitrate_bps: u64) {
        self.set_encoder_bitrate(requester, bitrate_bps, bitrate_bps, "REMB");
    }

    /// Sets the encoder's bit rate to `media_bps` (clamped to what the
    /// command line asked and [`MIN_KBPS`]) on `requester`'s `message` for
    /// `bitrate_bps`. False when the encoder cannot change it while playing.
    fn set_encoder_bitrate(&self, requester: u32, bitrate_bps: u64, media_bps: u64, message: &str) -> bool {
        let kbps = (media_bps / 1000).clamp(MIN_KBPS, u64::from(self.max_kbps)) as u32;
        let live = self
            .encoder
            .find_property("bitrate")
            .is_some_and(|p| p.flags().contains(gst::PARAM_FLAG_MUTABLE_PLAYING));
        if !live {
            tracing::warn!(requester, bitrate_bps, "{message} not honoured: the encoder cannot change its bit rate while playing");
            return false;
        }
        let before = self.counters.bitrate_kbps.swap(u64::from(kbps), Ordering::Relaxed);
        // A repeated REMB asks what is already set: the encoder is not
        // reconfigured for nothing.
        if before != u64::from(kbps) {
            self.encoder.set_property("bitrate", kbps);
            tracing::info!(requester, bitrate_bps, from_kbps = before, to_kbps = kbps, "encoder bit rate changed on {message}");
        }
        true
    }

    fn send_sender_report(&self, out: &mut Vec<u8>, tmmbn: Option<(u32, u64, u16)>, bye: bool) {
        let now = self.wallclock.now();
        let (rtp_ts, packets, octets) = {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let Some((ts, at)) = shared.last_frame else { return };
            let elapsed = at.elapsed().as_secs_f64() * self.wallclock.rate;
            (ts.wrapping_add((elapsed * self.clock_rate as f64) as u32), shared.packet_count, shared.octet_count)
        };
        let dlrr = self.last_rrtr.map(|(receiver, lrr, at)| (receiver, lrr, (at.elapsed().as_secs_f64() * 65_536.0) as u32));
        let info = rtp::SenderReportInfo {
            ntp_timestamp: rtp::ntp_timestamp(now),
            rtp_timestamp: rtp_ts,
            packet_count: packets,
            octet_count: octets,
            dlrr,
        };
        let written = rtp::write_sender_rtcp(self.ssrc, &self.cname, &info, out);
        if written.is_ok() && tmmbn.is_some() {
            rtp::append_tmmbn(out, self.ssrc, tmmbn);
        }
        if written.is_ok() && bye {
            rtp::append_bye(out, self.ssrc);
        }
        let sock = if self.rtcp_mux { &self.rtp } else { &self.rtcp };
        match written.map(|_| send_to_waiting(sock, out, self.rtcp_dest)) {
            Ok(Ok(_)) => {
                self.counters.srs_sent.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_returns_recent_packets_and_forgets_evicted_ones() {
        let mut h = PacketHistory::new(4);
        for seq in 65_533u16..=65_535 {
            h.insert(seq, &[seq as u8]);
        }
        h.insert(0, &[0]);
        h.insert(1, &[1]);
        assert_eq!(h.get(1), Some(&[1u8][..]));
        assert_eq!(h.get(0), Some(&[0u8][..]));
        assert_eq!(h.get(65_535), Some(&[255u8][..]));
        assert_eq!(h.get(65_533), None, "evicted by seq 1");
        assert_eq!(h.get(5), None, "never sent");
    }
}
