//! A reference FEC sender made only of GStreamer's elements:
//! `videotestsrc ! x264enc ! rtph264pay` followed by GStreamer's own FEC
//! encoder, `rtpst2022-1-fecenc` (column and row FEC each to a port of its
//! own; the payloader at `ssrc=0`, as that encoder expects) or
//! `rtpulpfecenc` (in-band, its own payload type), into UDP. No rtpbin and no
//! retransmission: FEC alone repairs. A pad probe on the encoder's output
//! records each access unit's content digest, as `gst_sender` does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gstreamer as gst;
use gstreamer::prelude::*;

use crate::gst_sender::GstSenderReport;

#[derive(Debug, Clone)]
pub enum GstFec {
    /// ST 2022-1: `columns` (L) × `rows` (D); column FEC (protecting each
    /// column of D packets) and row FEC (each row of L) to their own ports.
    St2022_1 { columns: u32, rows: u32, column_dest: SocketAddr, row_dest: SocketAddr },
    /// RFC 5109 ULPFEC in the media stream: `percentage` overhead.
    Ulpfec { percentage: u32, payload_type: u8 },
}

#[derive(Debug, Clone)]
pub struct GstFecSenderConfig {
    pub rtp_dest: SocketAddr,
    pub frames: u32,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub key_int: u32,
    pub bitrate_kbps: u32,
    pub payload_type: u8,
    pub fec: GstFec,
}

impl GstFecSenderConfig {
    pub fn new(rtp_dest: SocketAddr, fec: GstFec) -> Self {
        Self {
            rtp_dest,
            frames: 330,
            width: 1280,
            height: 720,
            fps: 30,
            key_int: 60,
            bitrate_kbps: 2500,
            payload_type: 96,
            fec,
        }
    }
}

fn udpsink(dest: SocketAddr) -> String {
    format!("udpsink host={} port={} sync=false async=false", dest.ip(), dest.port())
}

/// Streams `frames` frames live, then returns the encoder's digests.
pub fn run(cfg: &GstFecSenderConfig) -> anyhow::Result<GstSenderReport> {
    gst::init()?;
    let source = format!(
        "videotestsrc is-live=true num-buffers={frames} pattern=ball ! \
         video/x-raw,width={w},height={h},framerate={fps}/1 ! \
         x264enc name=enc tune=zerolatency speed-preset=ultrafast key-int-max={ki} bitrate={br} option-string=scenecut=0 ! \
         video/x-h264,stream-format=byte-stream,alignment=au,profile=baseline",
        frames = cfg.frames,
        w = cfg.width,
        h = cfg.height,
        fps = cfg.fps,
        ki = cfg.key_int,
        br = cfg.bitrate_kbps,
    );
    let media = udpsink(cfg.rtp_dest);
    let description = match &cfg.fec {
        GstFec::St2022_1 { columns, rows, column_dest, row_dest } => format!(
            "{source} ! rtph264pay pt={pt} mtu=1200 ssrc=0 ! \
             rtpst2022-1-fecenc name=fec columns={columns} rows={rows} ! {media} \
             fec.fec_0 ! {col} \
             fec.fec_1 ! {row}",
            pt = cfg.payload_type,
            col = udpsink(*column_dest),
            row = udpsink(*row_dest),
        ),
        GstFec::Ulpfec { percentage, payload_type } => format!(
            "{source} ! rtph264pay pt={pt} mtu=1200 ! \
             rtpulpfecenc pt={payload_type} percentage={percentage} multipacket=true ! {media}",
            pt = cfg.payload_type,
        ),
    };
    let pipeline = gst::parse::launch(&description)
        .with_context(|| format!("building the GStreamer FEC sender: {description}"))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("not a pipeline"))?;

    let digests: Arc<Mutex<Vec<u64>>> = Arc::default();
    {
        let enc = pipeline.by_name("enc").context("enc")?;
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

    let bus = pipeline.bus().context("bus")?;
    pipeline.set_state(gst::State::Playing)?;
    let budget = Duration::from_secs_f64(cfg.frames as f64 / cfg.fps as f64 * 3.0 + 30.0);
    let started = Instant::now();
    let result = loop {
        let Some(msg) = bus.timed_pop_filtered(
            gst::ClockTime::from_mseconds(100),
            &[gst::MessageType::Error, gst::MessageType::Eos],
        ) else {
            if started.elapsed() > budget {
                break Err(anyhow::anyhow!("GStreamer FEC sender did not finish {} frames within {budget:?}", cfg.frames));
            }
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => break Ok(()),
            gst::MessageView::Error(e) => break Err(anyhow::anyhow!("GStreamer FEC sender error: {} ({:?})", e.error(), e.debug())),
            _ => {}
        }
    };
    pipeline.set_state(gst::State::Null)?;
    result?;
    let digests = digests.lock().expect("lock").clone();
    if digests.len() != cfg.frames as usize {
        bail!("the encoder produced {} frames, expected {}", digests.len(), cfg.frames);
    }
    Ok(GstSenderReport { frames_sent: digests.len(), digests, rtx_packets_sent: 0 })
}
