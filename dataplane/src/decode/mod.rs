//! GStreamer decode: access units go in through `appsrc`, decoded frames are
//! counted and timed at an `appsink`.
//!
//! The decoder is chosen at run time: NVDEC (`nvh264dec`/`nvh265dec`) when the
//! nvcodec plugin registered it (it only does so when a GPU and driver are
//! present), else libav (`avdec_h264`/`avdec_h265`) with slice threading, which
//! adds no frame delay (frame threading would hold back one frame per thread).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use zerodrop_crds::{Codec, DecoderChoice};

use crate::metrics::StreamMetrics;
use crate::output::frames::FrameTap;

/// Access units handed in, awaited at the decoder's output: (presentation
/// time, arrival of the first packet, the sender's wallclock of the unit).
type Pending = Arc<Mutex<VecDeque<(u64, Instant, Option<f64>)>>>;

/// Initialises GStreamer once; safe to call from every thread.
pub fn init() -> anyhow::Result<()> {
    gst::init().context("GStreamer failed to initialise (is libgstreamer1.0 installed?)")
}

/// The decoder element for a codec and choice, or why none can be had.
pub fn choose_decoder(codec: Codec, choice: DecoderChoice) -> anyhow::Result<gst::Element> {
    init()?;
    let (nv, sw) = match codec {
        Codec::H264 => ("nvh264dec", "avdec_h264"),
        Codec::H265 => ("nvh265dec", "avdec_h265"),
    };
    let software = || -> anyhow::Result<gst::Element> {
        let e = gst::ElementFactory::make(sw).build().with_context(|| {
            format!("software decoder {sw} is not available: install gstreamer1.0-libav")
        })?;
        // Slice threads decode one frame in parallel without adding delay.
        e.set_property_from_str("thread-type", "slice");
        Ok(e)
    };
    match choice {
        DecoderChoice::Software => software(),
        DecoderChoice::Nvdec => gst::ElementFactory::make(nv).build().map_err(|_| {
            anyhow::anyhow!(
                "spec.decode.decoder is nvdec but GStreamer has no {nv} element here \
                 (needs an NVIDIA GPU, its driver and gstreamer1.0-plugins-bad with nvcodec); \
                 use `auto` to fall back to software"
            )
        }),
        DecoderChoice::Auto => match gst::ElementFactory::make(nv).build() {
            Ok(e) => Ok(e),
            Err(_) => software(),
        },
    }
}

/// A running decode pipeline for one stream.
pub struct Decoder {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    pending: Pending,
    sink_thread: Option<JoinHandle<()>>,
    name: String,
    metrics: StreamMetrics,
    first_pts: Option<u64>,
}

/// Frames queued in front of the decoder beyond which new ones are dropped
/// (and counted) rather than letting memory grow without bound.
const MAX_QUEUED_FRAMES: u64 = 300;

impl Decoder {
    /// `frames`, when given, is offered every decoded picture.
    pub fn start(
        codec: Codec,
        choice: DecoderChoice,
        metrics: StreamMetrics,
        frames: Option<Arc<FrameTap>>,
    ) -> anyhow::Result<Self> {
        let decoder = choose_decoder(codec, choice)?;
        let name = decoder
            .factory()
            .map(|f| f.name().to_string())
            .unwrap_or_else(|| "unknown".into());
        let caps_name = match codec {
            Codec::H264 => "video/x-h264",
            Codec::H265 => "video/x-h265",
        };
        let caps = gst::Caps::builder(caps_name)
            .field("stream-format", "byte-stream")
            .field("alignment", "au")
            .build();
        let appsrc = gst_app::AppSrc::builder()
            .caps(&caps)
            .format(gst::Format::Time)
            .is_live(true)
            .block(false)
            .max_bytes(0)
            .build();
        let parse = gst::ElementFactory::make(match codec {
            Codec::H264 => "h264parse",
            Codec::H265 => "h265parse",
        })
        .build()
        .context("h264parse/h265parse missing: install gstreamer1.0-plugins-bad")?;
        let appsink = gst_app::AppSink::builder()
            .sync(false)
            .max_buffers(64)
            .drop(false)
            .build();
        let pipeline = gst::Pipeline::with_name(&format!(
            "decode-{}-{}",
            metrics.labels.pipeline, metrics.labels.stream
        ));
        pipeline.add_many([appsrc.upcast_ref(), &parse, &decoder, appsink.upcast_ref()])?;
        gst::Element::link_many([appsrc.upcast_ref(), &parse, &decoder, appsink.upcast_ref()])?;
        pipeline
            .set_state(gst::State::Playing)
            .context("decode pipeline failed to start")?;
        metrics.set_decoder(&name);

        let pending: Pending = Arc::default();
        let sink_thread = {
            let pending = pending.clone();
            let metrics = metrics.clone();
            let bus = pipeline.bus().context("pipeline has no bus")?;
            let stream = format!("{}/{}", metrics.labels.pipeline, metrics.labels.stream);
            std::thread::Builder::new()
                .name(format!("decode-{}", metrics.labels.stream))
                .spawn(move || {
                    pull_decoded(appsink, bus, pending, metrics, stream, frames);
                })?
        };
        Ok(Decoder {
            pipeline,
            appsrc,
            pending,
            sink_thread: Some(sink_thread),
            name,
            metrics,
            first_pts: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands one access unit to the decoder, without copying its bytes.
    /// Returns false when the decoder is too far behind and the frame was not
    /// queued (the caller counts it as dropped).
    pub fn push(
        &mut self,
        data: Vec<u8>,
        pts_ns: u64,
        first_arrival: Instant,
        keyframe: bool,
        sender_time: Option<f64>,
    ) -> bool {
        if self.appsrc.current_level_buffers() >= MAX_QUEUED_FRAMES {
            return false;
        }
        let first = *self.first_pts.get_or_insert(pts_ns);
        let pts = pts_ns.saturating_sub(first);
        let mut buffer = gst::Buffer::from_mut_slice(data);
        {
            let b = buffer.get_mut().expect("fresh buffer is writable");
            b.set_pts(gst::ClockTime::from_nseconds(pts));
            if !keyframe {
                b.set_flags(gst::BufferFlags::DELTA_UNIT);
            }
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((pts, first_arrival, sender_time));
        self.appsrc.push_buffer(buffer).is_ok()
    }

    /// Sends end-of-stream and waits (bounded) for the decoder to drain.
    pub fn finish(mut self, timeout: Duration) {
        let _ = self.appsrc.end_of_stream();
        if let Some(handle) = self.sink_thread.take() {
            let deadline = Instant::now() + timeout;
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::park_timeout(Duration::from_millis(10));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                tracing::warn!(decoder = %self.name, stream = %self.metrics.labels.stream, "decoder did not drain in time");
            }
        }
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

fn pull_decoded(
    appsink: gst_app::AppSink,
    bus: gst::Bus,
    pending: Pending,
    metrics: StreamMetrics,
    stream: String,
    frames: Option<Arc<FrameTap>>,
) {
    loop {
        match appsink.try_pull_sample(gst::ClockTime::from_mseconds(100)) {
            Some(sample) => {
                let now = Instant::now();
                let pts = sample.buffer().and_then(|b| b.pts()).map(|p| p.nseconds());
                let mut q = pending.lock().unwrap_or_else(|e| e.into_inner());
                // Frames come out in presentation order; everything at or
                // before this PTS has been accounted for. A frame counts as
                // decoded only if it answers an access unit handed in: a
                // decoder that makes two pictures of one unit (or repeats one)
                // must not make the books show more frames than were sent.
                let mut matched = None;
                if pts.is_none() {
                    matched = q.pop_front().map(|(_, _, sender_time)| sender_time);
                }
                while let Some(pts) = pts
                    && let Some(&(p, arrival, sender_time)) = q.front()
                {
                    if p > pts {
                        break;
                    }
                    q.pop_front();
                    if p == pts {
                        StreamMetrics::observe(&metrics.decode_latency, now - arrival);
                        matched = Some(sender_time);
                    } else {
                        // Handed in, passed over: the decoder gave no picture for it.
                        metrics.frames_dropped_by_decoder(1);
                    }
                }
                drop(q);
                if let Some(sender_time) = matched {
                    metrics.frames_decoded.inc();
                    if let Some(tap) = &frames {
                        tap.offer(&sample, sender_time);
                    }
                } else {
                    tracing::debug!(%stream, ?pts, "decoder output answers no access unit handed in; not counted");
                }
            }
            None if appsink.is_eos() => {
                // Drained: whatever is still awaited never came out.
                let left = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain(..)
                    .count();
                if left > 0 {
                    metrics.frames_dropped_by_decoder(left as u64);
                    tracing::warn!(%stream, frames = left, "the decoder gave no picture for access units handed to it");
                }
                break;
            }
            None => {}
        }
        while let Some(msg) =
            bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning])
        {
            match msg.view() {
                gst::MessageView::Error(e) => {
                    tracing::error!(%stream, error = %e.error(), debug = ?e.debug(), "decoder error");
                }
                gst::MessageView::Warning(w) => {
                    tracing::warn!(%stream, warning = %w.error(), "decoder warning");
                }
                _ => {}
            }
        }
    }
}

/// Whether a decoder can be had for a codec and choice, checked before any
/// socket is bound. Cheap on purpose: `auto` and `software` only look the
/// software decoder up in the registry (`auto` falls back to it), and only an
/// explicit `nvdec` loads the NVIDIA plugin, which takes seconds (CUDA
/// initialisation) and would otherwise delay binding the ports.
pub fn check(codec: Codec, choice: DecoderChoice) -> anyhow::Result<()> {
    init()?;
    let sw = match codec {
        Codec::H264 => "avdec_h264",
        Codec::H265 => "avdec_h265",
    };
    match choice {
        DecoderChoice::Nvdec => choose_decoder(codec, choice).map(|_| ()),
        DecoderChoice::Auto | DecoderChoice::Software => {
            if gst::ElementFactory::find(sw).is_none() {
                bail!("software decoder {sw} is not available: install gstreamer1.0-libav");
            }
            Ok(())
        }
    }
}
