//! A reference RTP sender made only of GStreamer's own elements:
//! `videotestsrc ! x264enc ! rtph264pay ! rtpbin` with `rtprtxsend` as the
//! session's auxiliary sender (answering NACKs with RFC 4588 RTX), RTCP out
//! and in through one UDP socket (symmetric RTCP). A pad probe on the
//! encoder's output records each access unit's content digest, the same
//! digest the receiver logs for what it hands its decoder.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;

#[derive(Debug, Clone)]
pub struct GstSenderConfig {
    /// Where RTP (media and RTX) goes.
    pub rtp_dest: SocketAddr,
    /// Where RTCP (sender reports) goes; replies come back to our socket.
    pub rtcp_dest: SocketAddr,
    pub frames: u32,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub key_int: u32,
    pub bitrate_kbps: u32,
    pub payload_type: u8,
    pub rtx_payload_type: u8,
    /// How long to keep answering NACKs after the last frame.
    pub linger: Duration,
    /// `rtph264pay config-interval`: 0 sends SPS/PPS only as the encoder
    /// puts them in the stream, -1 repeats them before every IDR picture.
    pub config_interval: i32,
}

impl Default for GstSenderConfig {
    fn default() -> Self {
        Self {
            rtp_dest: "127.0.0.1:5004".parse().expect("literal"),
            rtcp_dest: "127.0.0.1:5005".parse().expect("literal"),
            frames: 600,
            width: 1280,
            height: 720,
            fps: 30,
            key_int: 60,
            bitrate_kbps: 2500,
            payload_type: 96,
            rtx_payload_type: 97,
            linger: Duration::from_secs(2),
            config_interval: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GstSenderReport {
    pub frames_sent: usize,
    pub digests: Vec<u64>,
    pub rtx_packets_sent: u64,
}

/// rtpbin's auxiliary sender/receiver for `session`: `element` in a bin with
/// the ghost pads `sink_N` and `src_N` that rtpbin links.
pub fn aux_bin(element: &gst::Element, session: u32) -> gst::Bin {
    let bin = gst::Bin::new();
    bin.add(element).expect("a fresh bin accepts the element");
    for dir in ["sink", "src"] {
        let pad = gst::GhostPad::with_target(&element.static_pad(dir).expect("rtx elements have sink and src"))
            .expect("ghost pad");
        pad.set_property("name", format!("{dir}_{session}"));
        bin.add_pad(&pad).expect("unique pad name");
    }
    bin
}

/// Links session 0's RTCP of `rtpbin` to the network through ONE UDP socket,
/// bound on loopback at `local_port` (0: any), sending to `dest`: the socket
/// that receives RTCP also sends it (symmetric RTCP, RFC 4961), so the peer
/// can answer to where our RTCP comes from.
pub fn symmetric_rtcp(pipeline: &gst::Pipeline, rtpbin: &gst::Element, local_port: u16, dest: SocketAddr) -> anyhow::Result<()> {
    let rtcp_src = gst::ElementFactory::make("udpsrc")
        .property("address", "127.0.0.1")
        .property("port", local_port as i32)
        .property("caps", gst::Caps::builder("application/x-rtcp").build())
        .build()?;
    let rtcp_sink = gst::ElementFactory::make("udpsink")
        .property("host", dest.ip().to_string())
        .property("port", dest.port() as i32)
        .property("sync", false)
        .property("async", false)
        .property("close-socket", false)
        .build()?;
    pipeline.add_many([&rtcp_src, &rtcp_sink])?;
    rtpbin
        .request_pad_simple("send_rtcp_src_0")
        .context("send_rtcp_src_0")?
        .link(&rtcp_sink.static_pad("sink").context("udpsink sink")?)?;
    rtcp_src
        .static_pad("src")
        .context("udpsrc src")?
        .link(&rtpbin.request_pad_simple("recv_rtcp_sink_0").context("recv_rtcp_sink_0")?)?;
    rtcp_src.set_state(gst::State::Ready)?;
    let socket: glib::Object = rtcp_src.property("used-socket");
    rtcp_sink.set_property("socket", &socket);
    Ok(())
}

/// Runs the sender to completion (all frames out, then `linger`).
pub fn run(cfg: &GstSenderConfig) -> anyhow::Result<GstSenderReport> {
    gst::init()?;
    let pipeline = gst::Pipeline::with_name("gst-reference-sender");
    let rtpbin = gst::ElementFactory::make("rtpbin").name("rtpbin").build()?;
    rtpbin.set_property_from_str("rtp-profile", "avpf");
    let rtx_pt = cfg.rtx_payload_type as u32;
    let pt = cfg.payload_type;
    let rtxsend: Arc<Mutex<Option<gst::Element>>> = Arc::default();
    {
        let rtxsend = rtxsend.clone();
        // rtpbin asks for an auxiliary sender when the session's send pad is
        // requested; rtprtxsend inside it turns retransmission requests into RTX.
        rtpbin.connect("request-aux-sender", false, move |args| {
            let session = args[1].get::<u32>().expect("session id");
            let rtx = gst::ElementFactory::make("rtprtxsend").build().expect("rtprtxsend exists");
            let map = gst::Structure::builder("application/x-rtp-pt-map").field(pt.to_string(), rtx_pt).build();
            rtx.set_property("payload-type-map", map);
            rtx.set_property("max-size-packets", 0u32);
            rtx.set_property("max-size-time", 2000u32);
            let bin = aux_bin(&rtx, session);
            *rtxsend.lock().expect("lock") = Some(rtx);
            Some(bin.to_value())
        });
    }
    pipeline.add(&rtpbin)?;

    let source = gst::parse::bin_from_description(
        &format!(
            "videotestsrc is-live=true num-buffers={frames} pattern=ball ! \
             video/x-raw,width={w},height={h},framerate={fps}/1 ! \
             x264enc name=enc tune=zerolatency speed-preset=ultrafast key-int-max={ki} bitrate={br} option-string=scenecut=0 ! \
             video/x-h264,stream-format=byte-stream,alignment=au,profile=baseline ! \
             rtph264pay name=pay pt={pt} mtu=1200 config-interval={ci}",
            frames = cfg.frames,
            w = cfg.width,
            h = cfg.height,
            fps = cfg.fps,
            ki = cfg.key_int,
            br = cfg.bitrate_kbps,
            pt = cfg.payload_type,
            ci = cfg.config_interval,
        ),
        true,
    )
    .context("building the x264 source bin")?;
    pipeline.add(&source)?;

    // Content digests of what the encoder produced.
    let digests: Arc<Mutex<Vec<u64>>> = Arc::default();
    {
        let enc = source.by_name("enc").context("enc")?;
        let digests = digests.clone();
        enc.static_pad("src").context("enc src")?.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(buffer) = info.buffer()
                && let Ok(map) = buffer.map_readable()
            {
                digests.lock().expect("lock").push(zerodrop_dataplane::depay::au::annexb_digest(&map));
            }
            gst::PadProbeReturn::Ok
        });
    }
    // Keep EOS from reaching rtpbin so that late NACKs still get answers
    // while we linger; the end of the source is signalled to us instead.
    let (eos_tx, eos_rx) = std::sync::mpsc::channel::<()>();
    {
        let pay_src = source.static_pad("src").context("source bin has no src ghost pad")?;
        let eos_tx = Mutex::new(eos_tx);
        pay_src.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
            if let Some(gst::PadProbeData::Event(e)) = &info.data
                && e.type_() == gst::EventType::Eos
            {
                let _ = eos_tx.lock().expect("lock").send(());
                return gst::PadProbeReturn::Drop;
            }
            gst::PadProbeReturn::Ok
        });
    }

    let send_rtp_sink = rtpbin.request_pad_simple("send_rtp_sink_0").context("send_rtp_sink_0")?;
    source.static_pad("src").context("src")?.link(&send_rtp_sink)?;
    let send_rtp_src = rtpbin.static_pad("send_rtp_src_0").context("send_rtp_src_0")?;

    let rtp_sink = gst::ElementFactory::make("udpsink")
        .property("host", cfg.rtp_dest.ip().to_string())
        .property("port", cfg.rtp_dest.port() as i32)
        .property("sync", false)
        .property("async", false)
        .build()?;
    pipeline.add(&rtp_sink)?;
    send_rtp_src.link(&rtp_sink.static_pad("sink").context("sink")?)?;
    // The receiver answers where our reports come from.
    symmetric_rtcp(&pipeline, &rtpbin, 0, cfg.rtcp_dest)?;

    let bus = pipeline.bus().context("bus")?;
    pipeline.set_state(gst::State::Playing)?;
    let started = Instant::now();
    let budget = Duration::from_secs_f64(cfg.frames as f64 / cfg.fps as f64 * 3.0 + 30.0);
    let mut source_done: Option<Instant> = None;
    loop {
        if let Some(msg) = bus.timed_pop_filtered(gst::ClockTime::from_mseconds(50), &[gst::MessageType::Error])
            && let gst::MessageView::Error(e) = msg.view()
        {
            let _ = pipeline.set_state(gst::State::Null);
            bail!("GStreamer sender error: {} ({:?})", e.error(), e.debug());
        }
        if source_done.is_none() && eos_rx.try_recv().is_ok() {
            source_done = Some(Instant::now());
        }
        if source_done.is_some_and(|t| t.elapsed() >= cfg.linger) {
            break;
        }
        if started.elapsed() > budget {
            let _ = pipeline.set_state(gst::State::Null);
            bail!("GStreamer sender did not finish {} frames within {budget:?}", cfg.frames);
        }
    }
    let rtx_packets_sent = rtxsend
        .lock()
        .expect("lock")
        .as_ref()
        .map(|e| e.property::<u32>("num-rtx-packets") as u64)
        .unwrap_or(0);
    pipeline.set_state(gst::State::Null)?;
    let digests = digests.lock().expect("lock").clone();
    Ok(GstSenderReport { frames_sent: digests.len(), digests, rtx_packets_sent })
}
