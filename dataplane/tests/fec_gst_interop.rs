//! Our FEC codec against GStreamer 1.22's own elements, both ways:
//!
//! - what `rtpst2022-1-fecenc` and `rtpulpfecenc` send (from a real x264
//!   stream), our decoder recovers byte for byte, single losses and 2-D
//!   patterns;
//! - our encoders write the very datagrams GStreamer's encoders write, given
//!   the same media;
//! - what our encoders write, `rtpst2022-1-fecdec` and `rtpulpfecdec` recover.
//!
//! GStreamer runs as fast as it can into appsinks whose callbacks record every
//! datagram in emission order; tests wait for end of stream on a channel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use zerodrop_dataplane::repair::fec::st2022_1::{Direction, FecPacket, St2022Encoder};
use zerodrop_dataplane::repair::fec::ulpfec::{UlpfecEncoder, UlpfecOutput, UlpfecPacket, UlpfecSettings};
use zerodrop_dataplane::repair::fec::{FecDecoder, FecScheme, Outlook};
use zerodrop_dataplane::rtp::{RtpPacket, SeqExtender};

/// Matrix of the ST 2022-1 runs: L columns, D rows.
const L: u64 = 5;
const D: u64 = 4;
const ST2022_PT: u8 = 100;
const ULPFEC_PT: u8 = 122;
const ULPFEC_SSRC: u32 = 0x1234_5678;
const SOURCE: &str = "videotestsrc num-buffers=120 ! x264enc tune=zerolatency key-int-max=30";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Media,
    ColumnFec,
    RowFec,
    /// Media as the payloader wrote it, before `rtpulpfecenc` renumbered it.
    Original,
}

/// Runs `description` to end of stream and returns every datagram its
/// appsinks (`sinks`: name and stream) received, in the order they were
/// pushed. End of stream is awaited on the sinks named in `eos_from`.
fn capture(description: &str, sinks: &[(&str, Stream)], eos_from: &[&str]) -> Vec<(Stream, Vec<u8>)> {
    gst::init().unwrap();
    let pipeline = gst::parse::launch(description).unwrap().downcast::<gst::Pipeline>().unwrap();
    let packets = Arc::new(Mutex::new(Vec::new()));
    let (eos_tx, eos_rx) = mpsc::channel();
    for &(name, stream) in sinks {
        let sink = pipeline.by_name(name).unwrap().downcast::<gst_app::AppSink>().unwrap();
        let packets = packets.clone();
        let eos_tx = eos_tx.clone();
        let name = name.to_string();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let map = sample
                        .buffer()
                        .ok_or(gst::FlowError::Error)?
                        .map_readable()
                        .map_err(|_| gst::FlowError::Error)?;
                    packets.lock().unwrap().push((stream, map.to_vec()));
                    Ok(gst::FlowSuccess::Ok)
                })
                .eos(move |_| eos_tx.send(name.clone()).unwrap())
                .build(),
        );
    }
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut waiting: BTreeSet<&str> = eos_from.iter().copied().collect();
    let bus = pipeline.bus().unwrap();
    while !waiting.is_empty() {
        match eos_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(name) => {
                waiting.remove(name.as_str());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
                    panic!("`{description}` failed: {msg:?}");
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    packets.lock().unwrap().clone()
}

fn seq(datagram: &[u8]) -> u16 {
    u16::from_be_bytes([datagram[2], datagram[3]])
}

/// The ST 2022-1 run, shared by the tests: media with SSRC 0 (the encoder
/// refuses anything else), column FEC from pad `fec_0`, row FEC from `fec_1`.
fn st2022_capture() -> &'static [(Stream, Vec<u8>)] {
    static CAPTURE: OnceLock<Vec<(Stream, Vec<u8>)>> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let description = format!(
            "{SOURCE} ! rtph264pay ssrc=0 mtu=1200 ! rtpst2022-1-fecenc name=fec columns={L} rows={D} pt={ST2022_PT} \
             ! appsink name=media sync=false \
             fec.fec_0 ! appsink name=column sync=false async=false \
             fec.fec_1 ! appsink name=row sync=false async=false"
        );
        let sinks = [("media", Stream::Media), ("column", Stream::ColumnFec), ("row", Stream::RowFec)];
        capture(&description, &sinks, &["media"])
    })
}

/// Media by extended sequence number.
fn media_by_seq(packets: &[(Stream, Vec<u8>)]) -> BTreeMap<u64, Vec<u8>> {
    let mut seqs = SeqExtender::default();
    packets.iter().filter(|(s, _)| *s == Stream::Media).map(|(_, d)| (seqs.extend(seq(d)), d.clone())).collect()
}

/// Feeds a decoder the datagrams in order, without the `lost` media packets,
/// recovering after each media packet as a receive loop would (a row FEC
/// packet comes just before the last packet of its row, so not after FEC);
/// returns the decoder and what it recovered.
fn receive(scheme: FecScheme, packets: &[(Stream, Vec<u8>)], lost: &[u64]) -> (FecDecoder, BTreeMap<u64, Vec<u8>>) {
    let mut dec = FecDecoder::new(scheme, 1024);
    let mut seqs = SeqExtender::default();
    let mut highest = 0;
    let mut recovered = BTreeMap::new();
    let mut record = |s: u64, d: &[u8]| assert!(recovered.insert(s, d.to_vec()).is_none(), "{s} recovered twice");
    for (stream, datagram) in packets {
        match stream {
            Stream::Media => {
                let ext = seqs.extend(seq(datagram));
                highest = highest.max(ext);
                if !lost.contains(&ext) {
                    dec.push_media(ext, datagram);
                }
                dec.recover(&mut record);
            }
            Stream::ColumnFec | Stream::RowFec => dec.push_fec(datagram, highest).unwrap(),
            Stream::Original => {}
        }
    }
    dec.recover(&mut record);
    (dec, recovered)
}

/// Extended sequence numbers each FEC packet protects.
fn protected_by(packets: &[(Stream, Vec<u8>)]) -> Vec<(Stream, Vec<u64>)> {
    let media = media_by_seq(packets);
    let by_low: BTreeMap<u16, u64> = media.keys().map(|&s| (s as u16, s)).collect();
    packets
        .iter()
        .filter(|(s, _)| matches!(s, Stream::ColumnFec | Stream::RowFec))
        .map(|(s, d)| (*s, FecPacket::parse(d).unwrap().protected().map(|p| by_low[&p]).collect()))
        .collect()
}

#[test]
fn gstreamer_st2022_1_fec_has_the_documented_wire_conventions() {
    let packets = st2022_capture();
    let media = media_by_seq(packets);
    let first = *media.keys().next().unwrap();
    let (mut columns, mut rows) = (0u16, 0u16);
    for (stream, d) in packets {
        if *stream == Stream::Media {
            assert_eq!(RtpPacket::parse(d).unwrap().ssrc(), 0);
            continue;
        }
        let fec = FecPacket::parse(d).unwrap();
        assert_eq!(
            (fec.ssrc(), fec.payload_type(), fec.mask(), fec.x(), fec.index(), fec.sn_base_ext()),
            (0, ST2022_PT, 0, false, 0, 0)
        );
        let base = media.keys().find(|&&s| s as u16 == fec.sn_base_low()).unwrap() - first;
        match stream {
            Stream::ColumnFec => {
                assert_eq!(fec.direction(), Direction::Column, "pad fec_0 carries column FEC, D=0");
                assert_eq!((fec.offset(), fec.na()), (L as u8, D as u8));
                assert_eq!(fec.sequence_number(), columns, "column FEC numbered from 0");
                assert_eq!(
                    base,
                    (columns as u64 / L) * L * D + columns as u64 % L,
                    "matrices start at the first packet"
                );
                columns += 1;
            }
            Stream::RowFec => {
                assert_eq!(fec.direction(), Direction::Row, "pad fec_1 carries row FEC, D=1");
                assert_eq!((fec.offset(), fec.na()), (1, L as u8));
                assert_eq!(fec.sequence_number(), rows, "row FEC numbered from 0");
                assert_eq!(base, rows as u64 * L);
                rows += 1;
            }
            _ => unreachable!(),
        }
    }
    let n = media.len() as u64;
    assert_eq!(u64::from(rows), n / L);
    assert_eq!(u64::from(columns), n / (L * D) * L, "held-back columns go out at EOS");
    eprintln!("ST 2022-1 {L}x{D}: {n} media packets, {rows} row and {columns} column FEC packets");
}

#[test]
fn gstreamer_st2022_1_single_losses_recover_byte_for_byte() {
    let packets = st2022_capture();
    let media = media_by_seq(packets);
    let protected: BTreeSet<u64> = protected_by(packets).into_iter().flat_map(|(_, p)| p).collect();
    let mut recovered_count = 0;
    for (&s, original) in &media {
        let (dec, recovered) = receive(FecScheme::St2022_1, packets, &[s]);
        if protected.contains(&s) {
            assert_eq!(recovered.get(&s), Some(original), "seq {s}");
            recovered_count += 1;
        } else {
            // Only the packets at the end, whose FEC was still to come at EOS.
            assert!(recovered.is_empty(), "{s} has no FEC yet was recovered");
            assert!(s + 2 * L * D > *media.keys().last().unwrap(), "{s} is unprotected");
            assert!(matches!(dec.outlook(s, *media.keys().last().unwrap()), Outlook::Waiting { .. }));
        }
        assert_eq!(dec.counters().fec_unusable + dec.counters().fec_malformed, 0);
    }
    eprintln!("ST 2022-1: {recovered_count} of {} single losses recovered (the rest had no FEC)", media.len());
    assert!(recovered_count * 10 >= media.len() * 8, "{recovered_count} of {}", media.len());
}

#[test]
fn gstreamer_st2022_1_two_dimensional_patterns() {
    let packets = st2022_capture();
    let media = media_by_seq(packets);
    let first = *media.keys().next().unwrap();
    let highest = *media.keys().last().unwrap();
    let full_matrices = (media.len() as u64 / (L * D)).saturating_sub(1);
    assert!(full_matrices >= 3);
    let cell = |m: u64, r: u64, c: u64| first + m * L * D + r * L + c;
    for m in 0..full_matrices {
        let recoverable = [
            vec![cell(m, 1, 1), cell(m, 2, 1), cell(m, 2, 2)], // L-shape
            vec![cell(m, 0, 3), cell(m, 1, 3), cell(m, 2, 3), cell(m, 1, 4)], // column plus one
            (0..L).map(|c| cell(m, 3, c)).collect(),           // a whole row
            (0..D).map(|r| cell(m, r, 0)).collect(),           // a whole column
        ];
        for lost in recoverable {
            let (dec, recovered) = receive(FecScheme::St2022_1, packets, &lost);
            assert_eq!(
                recovered.keys().copied().collect::<BTreeSet<_>>(),
                lost.iter().copied().collect(),
                "matrix {m}"
            );
            assert!(lost.iter().all(|s| recovered[s] == media[s]));
            let c = dec.counters();
            assert_eq!(c.recovered_row + c.recovered_column, lost.len() as u64);
        }
        let square = [cell(m, 1, 1), cell(m, 1, 2), cell(m, 2, 1), cell(m, 2, 2)];
        let (dec, recovered) = receive(FecScheme::St2022_1, packets, &square);
        assert!(recovered.is_empty(), "matrix {m}: a 2x2 square cannot be recovered");
        for s in square {
            assert_eq!(dec.outlook(s, highest), Outlook::Hopeless);
        }
    }
}

#[test]
fn our_st2022_1_encoder_writes_what_gstreamer_writes() {
    let packets = st2022_capture();
    // Each FEC packet is pushed just before the media packet it goes with.
    let mut expected = Vec::new();
    let mut media_index = 0usize;
    for (stream, d) in packets {
        match stream {
            Stream::Media => media_index += 1,
            Stream::ColumnFec => expected.push((media_index, Direction::Column, d.clone())),
            Stream::RowFec => expected.push((media_index, Direction::Row, d.clone())),
            Stream::Original => {}
        }
    }
    let mut enc = St2022Encoder::new(L as u8, D as u8, ST2022_PT);
    let mut ours = Vec::new();
    for (i, (_, d)) in packets.iter().filter(|(s, _)| *s == Stream::Media).enumerate() {
        enc.push(d, &mut |dir, fec| ours.push((i, dir, fec.to_vec()))).unwrap();
    }
    enc.finish(&mut |dir, fec| ours.push((media_index, dir, fec.to_vec())));
    assert_eq!(ours.len(), expected.len());
    for (ours, theirs) in ours.iter().zip(&expected) {
        assert_eq!(ours, theirs);
    }
}

/// Pushes buffers and events straight into sink pads of `elements` (linked
/// in a chain ending in an appsink) from this thread, so everything happens
/// in order, and returns what reached the appsink.
struct DirectPipeline {
    pipeline: gst::Pipeline,
    out: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl DirectPipeline {
    fn new(description: &str) -> Self {
        gst::init().unwrap();
        let pipeline = gst::parse::launch(description).unwrap().downcast::<gst::Pipeline>().unwrap();
        let sink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let collected = out.clone();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let map = sample
                        .buffer()
                        .ok_or(gst::FlowError::Error)?
                        .map_readable()
                        .map_err(|_| gst::FlowError::Error)?;
                    collected.lock().unwrap().push(map.to_vec());
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        pipeline.set_state(gst::State::Playing).unwrap();
        Self { pipeline, out }
    }

    fn start(pad: &gst::Pad, caps: &str, id: &str) {
        assert!(pad.send_event(gst::event::StreamStart::new(id)));
        assert!(pad.send_event(gst::event::Caps::new(&caps.parse::<gst::Caps>().unwrap())));
        assert!(pad.send_event(gst::event::Segment::new(&gst::FormattedSegment::<gst::ClockTime>::new())));
    }

    fn chain(pad: &gst::Pad, datagram: &[u8]) {
        let mut buffer = gst::Buffer::from_slice(datagram.to_vec());
        buffer.get_mut().unwrap().set_pts(gst::ClockTime::ZERO);
        pad.chain(buffer).unwrap();
    }
}

impl Drop for DirectPipeline {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[test]
fn gstreamer_st2022_1_decoder_recovers_what_our_encoder_sends() {
    let media: Vec<Vec<u8>> =
        st2022_capture().iter().filter(|(s, _)| *s == Stream::Media).map(|(_, d)| d.clone()).collect();
    // One loss per row of matrices 1 and 2 (row FEC), and a whole column of
    // matrix 3 (column FEC).
    let mut lost: BTreeSet<usize> = (L * D..3 * L * D).step_by(L as usize + 1).map(|i| i as usize).collect();
    lost.extend((0..D).map(|r| (3 * L * D + r * L + 2) as usize));

    let p = DirectPipeline::new("rtpst2022-1-fecdec name=dec ! appsink name=out sync=false async=false");
    let dec = p.pipeline.by_name("dec").unwrap();
    let media_pad = dec.static_pad("sink").unwrap();
    let column_pad = dec.request_pad_simple("fec_%u").unwrap();
    let row_pad = dec.request_pad_simple("fec_%u").unwrap();
    DirectPipeline::start(
        &media_pad,
        "application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload=96",
        "media",
    );
    DirectPipeline::start(&column_pad, "application/x-rtp,payload=100", "column");
    DirectPipeline::start(&row_pad, "application/x-rtp,payload=100", "row");
    let mut enc = St2022Encoder::new(L as u8, D as u8, ST2022_PT);
    for (i, m) in media.iter().enumerate() {
        if !lost.contains(&i) {
            DirectPipeline::chain(&media_pad, m);
        }
        enc.push(m, &mut |dir, fec| {
            DirectPipeline::chain(if dir == Direction::Column { &column_pad } else { &row_pad }, fec)
        })
        .unwrap();
    }
    enc.finish(&mut |_, fec| DirectPipeline::chain(&column_pad, fec));
    let out = p.out.lock().unwrap().clone();
    let by_seq: BTreeMap<u16, &Vec<u8>> = out.iter().map(|d| (seq(d), d)).collect();
    for &i in &lost {
        assert_eq!(by_seq.get(&seq(&media[i])), Some(&&media[i]), "GStreamer recovered media packet {i} byte for byte");
    }
    assert_eq!(out.len(), media.len());
}

/// A run of `rtpulpfecenc`, with the payloader's media before it, at the
/// encoder's `bitrate` (kbit/s).
fn ulpfec_capture(percentage: u32, multipacket: bool, bitrate: u32) -> Vec<(Stream, Vec<u8>)> {
    let description = format!(
        "{SOURCE} bitrate={bitrate} ! rtph264pay ssrc={ULPFEC_SSRC} mtu=1200 ! tee name=t \
         t. ! queue ! appsink name=original sync=false \
         t. ! queue ! rtpulpfecenc percentage={percentage} multipacket={multipacket} pt={ULPFEC_PT} \
         ! appsink name=protected sync=false"
    );
    let sinks = [("original", Stream::Original), ("protected", Stream::Media)];
    capture(&description, &sinks, &["original", "protected"])
}

/// Splits `rtpulpfecenc`'s output by payload type, the way a receiver must.
fn ulpfec_receive_order(packets: &[(Stream, Vec<u8>)]) -> Vec<(Stream, Vec<u8>)> {
    packets
        .iter()
        .filter(|(s, _)| *s == Stream::Media)
        .map(|(_, d)| {
            let fec = RtpPacket::parse(d).unwrap().payload_type() == ULPFEC_PT;
            (if fec { Stream::ColumnFec } else { Stream::Media }, d.clone())
        })
        .collect()
}

/// Runs the decoder over a ULPFEC stream, where media and FEC share one
/// sequence space that the receiver extends as a whole, recovering after
/// every datagram.
fn ulpfec_decode(packets: &[(Stream, Vec<u8>)], lost: u64) -> BTreeMap<u64, Vec<u8>> {
    let mut dec = FecDecoder::new(FecScheme::Ulpfec, 1024);
    let mut seqs = SeqExtender::default();
    let mut recovered = BTreeMap::new();
    for (stream, d) in packets {
        let ext = seqs.extend(seq(d));
        match stream {
            Stream::Media if ext != lost => dec.push_media(ext, d),
            Stream::Media => {}
            _ => dec.push_fec(d, ext).unwrap(),
        }
        dec.recover(&mut |s, d| assert!(recovered.insert(s, d.to_vec()).is_none(), "{s} recovered twice"));
    }
    recovered
}

#[test]
fn gstreamer_ulpfec_protected_losses_recover_byte_for_byte() {
    // At 2 Mbit/s every frame spans several packets; at 150 kbit/s most are
    // one packet and wait for the budget to reach a whole FEC packet.
    for (percentage, bitrate) in [(30, 2048), (30, 150), (100, 150)] {
        let packets = ulpfec_receive_order(&ulpfec_capture(percentage, true, bitrate));
        let mut seqs = SeqExtender::default();
        let all: Vec<(u64, Stream, Vec<u8>)> =
            packets.iter().map(|(s, d)| (seqs.extend(seq(d)), *s, d.clone())).collect();
        let media: BTreeMap<u64, Vec<u8>> =
            all.iter().filter(|(_, s, _)| *s == Stream::Media).map(|(e, _, d)| (*e, d.clone())).collect();
        let by_low: BTreeMap<u16, u64> = media.keys().map(|&s| (s as u16, s)).collect();
        let mut protected = BTreeSet::new();
        let mut sequence_space = Vec::new();
        for (ext, stream, d) in &all {
            sequence_space.push(*ext);
            if *stream != Stream::Media {
                let fec = UlpfecPacket::parse(d).unwrap();
                assert_eq!(
                    (fec.rtp().ssrc(), fec.rtp().marker_bit()),
                    (ULPFEC_SSRC, false),
                    "FEC shares the media SSRC"
                );
                protected.extend(fec.protected().map(|p| by_low[&p]));
            }
        }
        assert_eq!(
            sequence_space,
            (sequence_space[0]..sequence_space[0] + sequence_space.len() as u64).collect::<Vec<_>>(),
            "media and FEC share one gapless sequence space"
        );
        for &s in media.keys() {
            let recovered = ulpfec_decode(&packets, s);
            if protected.contains(&s) {
                assert_eq!(recovered.get(&s), Some(&media[&s]), "{percentage}% at {bitrate} kbit/s: seq {s}");
            } else {
                assert!(recovered.is_empty(), "{percentage}% at {bitrate} kbit/s: {s} had no FEC yet was recovered");
            }
        }
        let fec_count = all.len() - media.len();
        eprintln!(
            "ULPFEC {percentage}% at {bitrate} kbit/s: {} of {} media packets protected and recovered alone ({:.0}%), {fec_count} FEC packets",
            protected.len(),
            media.len(),
            100.0 * protected.len() as f64 / media.len() as f64
        );
        assert!(!protected.is_empty());
        if percentage == 100 {
            assert_eq!(protected.len(), media.len(), "100% protects every packet");
        }
    }
}

#[test]
fn our_ulpfec_encoder_writes_what_gstreamer_writes() {
    for (percentage, multipacket, bitrate) in
        [(10, true, 2048), (30, true, 150), (50, true, 2048), (100, true, 2048), (25, false, 2048)]
    {
        let packets = ulpfec_capture(percentage, multipacket, bitrate);
        let theirs: Vec<&Vec<u8>> = packets.iter().filter(|(s, _)| *s == Stream::Media).map(|(_, d)| d).collect();
        let settings = UlpfecSettings { payload_type: ULPFEC_PT, percentage: percentage as u8, multipacket };
        let mut enc = UlpfecEncoder::new(settings);
        let mut ours = Vec::new();
        for (_, d) in packets.iter().filter(|(s, _)| *s == Stream::Original) {
            enc.push(d, &mut |_, out| ours.push(out.to_vec())).unwrap();
        }
        assert_eq!(ours.len(), theirs.len(), "{percentage}% multipacket={multipacket}");
        for (i, (ours, theirs)) in ours.iter().zip(theirs).enumerate() {
            assert_eq!(ours, theirs, "{percentage}% multipacket={multipacket}: datagram {i}");
        }
    }
}

#[test]
fn gstreamer_ulpfec_decoder_recovers_what_our_encoder_sends() {
    let original: Vec<Vec<u8>> =
        ulpfec_capture(0, true, 2048).into_iter().filter(|(s, _)| *s == Stream::Original).map(|(_, d)| d).collect();
    let mut enc = UlpfecEncoder::new(UlpfecSettings { payload_type: ULPFEC_PT, percentage: 50, multipacket: true });
    let mut sent: Vec<(UlpfecOutput, Vec<u8>)> = Vec::new();
    for d in &original {
        enc.push(d, &mut |kind, out| sent.push((kind, out.to_vec()))).unwrap();
    }
    // Every fifth media packet that some FEC packet protects is lost.
    let protected: BTreeSet<u16> = sent
        .iter()
        .filter(|(k, _)| *k == UlpfecOutput::Fec)
        .flat_map(|(_, d)| UlpfecPacket::parse(d).unwrap().protected().collect::<Vec<_>>())
        .collect();
    let lost: Vec<&Vec<u8>> = sent
        .iter()
        .filter(|(k, d)| *k == UlpfecOutput::Media && protected.contains(&seq(d)))
        .map(|(_, d)| d)
        .step_by(5)
        .collect();
    assert!(lost.len() >= 10);

    let p = DirectPipeline::new(&format!(
        "rtpstorage name=storage size-time=10000000000 ! rtpulpfecdec name=dec pt={ULPFEC_PT} \
         ! appsink name=out sync=false async=false"
    ));
    let pad = p.pipeline.by_name("storage").unwrap().static_pad("sink").unwrap();
    DirectPipeline::start(
        &pad,
        &format!(
            "application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload=96,ssrc=(uint){ULPFEC_SSRC}"
        ),
        "ulpfec",
    );
    for (_, d) in &sent {
        if !lost.contains(&d) {
            DirectPipeline::chain(&pad, d);
        }
    }
    let before = p.out.lock().unwrap().len();
    for d in &lost {
        let event = gst::event::CustomDownstream::new(
            gst::Structure::builder("GstRTPPacketLost")
                .field("seqnum", u32::from(seq(d)))
                .field("timestamp", 0u64)
                .field("duration", 0u64)
                .build(),
        );
        assert!(pad.send_event(event));
    }
    let out = p.out.lock().unwrap().clone();
    let recovered = &out[before..];
    assert_eq!(recovered.len(), lost.len(), "rtpulpfecdec recovered every lost packet");
    for (got, want) in recovered.iter().zip(&lost) {
        // rtpulpfecdec renumbers everything it pushes; all else is identical.
        assert_eq!((&got[..2], &got[4..]), (&want[..2], &want[4..]));
    }
    let dec = p.pipeline.by_name("dec").unwrap();
    assert_eq!(dec.property::<u32>("recovered") as usize, lost.len());
}
