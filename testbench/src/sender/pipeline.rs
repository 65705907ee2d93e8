//! The GStreamer half of the test sender: a live test pattern, a real H.264 or
//! H.265 encoder and the RTP payloader, ending in an appsink the sender pulls.
//! A pad probe on the encoder's output records each access unit's digest
//! before payloading, i.e. exactly what a receiver must reassemble.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, anyhow};
use crossbeam_channel::{Receiver, Sender};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::{AggregateMode, Codec, SendArgs};
use zerodrop_dataplane::depay::au;

/// One access unit as the encoder produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuRecord {
    /// 0-based index in encoder output order.
    pub index: u64,
    pub pts: Option<gst::ClockTime>,
    /// [`au::annexb_digest`] of the access unit.
    pub digest: u64,
    pub keyframe: bool,
}

pub(super) struct EncoderPipeline {
    pipeline: gst::Pipeline,
    encoder: gst::Element,
    pub(super) appsink: gst_app::AppSink,
    pub(super) aus: Receiver<AuRecord>,
}

/// The `gst-launch` description of the sender pipeline.
pub(super) fn description(args: &SendArgs, ssrc: u32) -> String {
    let num_buffers = args.frames.map(|n| format!(" num-buffers={n}")).unwrap_or_default();
    let (encoder, caps, payloader) = match args.codec {
        // scenecut=0 keeps GOPs at key-int frames, as a broadcast encoder does.
        Codec::H264 => (
            format!(
                "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={} bitrate={} option-string=scenecut=0",
                args.key_int, args.bitrate
            ),
            "video/x-h264",
            "rtph264pay",
        ),
        // x265 writes VPS/SPS/PPS only once unless told to repeat them; without
        // them at every IDR a receiver cannot recover from loss with a keyframe.
        Codec::H265 => (
            format!(
                "x265enc tune=zerolatency speed-preset=ultrafast key-int-max={} bitrate={} \
                 option-string=open-gop=0:scenecut=0:repeat-headers=1",
                args.key_int, args.bitrate
            ),
            "video/x-h265",
            "rtph265pay",
        ),
    };
    let aggregate = match args.aggregate_mode {
        AggregateMode::None => "none",
        AggregateMode::ZeroLatency => "zero-latency",
        AggregateMode::MaxStap => "max-stap",
    };
    format!(
        "videotestsrc is-live=true pattern={pattern}{num_buffers} \
         ! video/x-raw,format=I420,width={w},height={h},framerate={fps}/1 \
         ! {encoder} name=enc \
         ! {caps},stream-format=byte-stream,alignment=au \
         ! {payloader} name=pay pt={pt} mtu={mtu} config-interval={ci} aggregate-mode={aggregate} ssrc={ssrc} \
         ! appsink name=sink sync=false max-buffers=0 drop=false emit-signals=false",
        pattern = args.pattern,
        w = args.width,
        h = args.height,
        fps = args.fps,
        pt = args.pt,
        mtu = args.mtu,
        ci = args.config_interval,
    )
}

impl EncoderPipeline {
    pub(super) fn build(args: &SendArgs, ssrc: u32, frames_encoded: Arc<AtomicU64>) -> anyhow::Result<Self> {
        gst::init().context("initialising GStreamer")?;
        let desc = description(args, ssrc);
        let element = gst::parse::launch(&desc).with_context(|| format!("building the sender pipeline `{desc}`"))?;
        let pipeline = element
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("the sender description did not produce a pipeline"))?;
        let encoder = pipeline.by_name("enc").context("encoder element `enc` missing")?;
        let appsink = pipeline
            .by_name("sink")
            .context("appsink `sink` missing")?
            .downcast::<gst_app::AppSink>()
            .map_err(|_| anyhow!("`sink` is not an appsink"))?;
        let (tx, aus) = crossbeam_channel::unbounded();
        install_digest_probe(&encoder, tx, frames_encoded)?;
        Ok(Self { pipeline, encoder, appsink, aus })
    }

    pub(super) fn start(&self) -> anyhow::Result<()> {
        if self.pipeline.set_state(gst::State::Playing).is_err() {
            let detail = self.pop_error().unwrap_or_else(|| "no error message on the bus".into());
            anyhow::bail!("the sender pipeline did not start: {detail}");
        }
        Ok(())
    }

    /// Ends the stream at the source; the appsink sees EOS once the encoder
    /// and payloader have flushed.
    pub(super) fn send_eos(&self) {
        self.pipeline.send_event(gst::event::Eos::new());
    }

    pub(super) fn encoder(&self) -> gst::Element {
        self.encoder.clone()
    }

    /// The first error posted on the bus, with the element that posted it.
    pub(super) fn pop_error(&self) -> Option<String> {
        let bus = self.pipeline.bus()?;
        let msg = bus.pop_filtered(&[gst::MessageType::Error])?;
        let gst::MessageView::Error(err) = msg.view() else { return None };
        let source = msg.src().map(|s| s.path_string().to_string()).unwrap_or_else(|| "pipeline".into());
        Some(match err.debug() {
            Some(debug) => format!("{source}: {} ({debug})", err.error()),
            None => format!("{source}: {}", err.error()),
        })
    }
}

impl Drop for EncoderPipeline {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Asks the encoder for a keyframe with its parameter sets (the upstream
/// `GstForceKeyUnit` event that gstreamer-video would build).
pub(super) fn force_keyframe(encoder: &gst::Element) -> bool {
    let event = gst::event::CustomUpstream::new(
        gst::Structure::builder("GstForceKeyUnit").field("all-headers", true).build(),
    );
    encoder.static_pad("src").is_some_and(|pad| pad.send_event(event))
}

fn install_digest_probe(
    encoder: &gst::Element,
    tx: Sender<AuRecord>,
    frames_encoded: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let pad = encoder.static_pad("src").context("encoder has no src pad")?;
    pad.add_probe(gst::PadProbeType::BUFFER, move |_pad, info| {
        if let Some(buffer) = info.buffer() {
            // A buffer that cannot be mapped still counts as a frame; its
            // digest (of nothing) will simply not match the receiver's.
            let digest = buffer.map_readable().map(|m| au::annexb_digest(m.as_slice())).unwrap_or(0);
            let index = frames_encoded.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(AuRecord {
                index,
                pts: buffer.pts(),
                digest,
                keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
            });
        }
        gst::PadProbeReturn::Ok
    })
    .context("adding the digest probe on the encoder output")?;
    Ok(())
}
