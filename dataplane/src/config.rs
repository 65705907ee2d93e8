//! From a validated `StreamPipeline` to what one receiver needs. Pure: the
//! local runner and the pod both go through here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use zerodrop_core::limits::DEFAULT_RECEIVE_BUFFER_BYTES;
use zerodrop_crds::{Codec, DecoderChoice, FecScheme, StreamPipeline};

pub use crate::depay::sprop::parse_parameter_sets;
use crate::repair::jitter::JitterSettings;

#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    pub pipeline: String,
    pub name: String,
    pub codec: Codec,
    pub payload_type: u8,
    pub clock_rate: u32,
    pub rtx_payload_type: Option<u8>,
    /// Where pushed RTP arrives (unused, unspecified, for a pulled source).
    pub rtp_bind: SocketAddr,
    /// `None` with rtcp-mux: RTCP shares the RTP socket (and for a pulled
    /// source, whose RTCP comes with its RTP).
    pub rtcp_bind: Option<SocketAddr>,
    pub receive_buffer: usize,
    pub jitter: JitterSettings,
    pub decoder: DecoderChoice,
    /// FEC to decode: declared by the source and enabled in `repair.fec`.
    pub fec: Option<FecSource>,
    /// Parameter sets the sender gives out of band (`parameterSets`), NAL
    /// units without start codes; empty when they come in band.
    pub parameter_sets: Vec<Vec<u8>>,
    /// HLS output (`spec.outputs.hls`), if asked for.
    pub hls: Option<crate::output::hls::HlsSettings>,
    /// Frames for analytics (`spec.outputs.frames`), if asked for.
    pub frames: Option<crate::output::frames::FrameSettings>,
    /// RTP restream (`spec.sources[].outputs.restream`), if asked for.
    pub restream: Option<crate::output::restream::RestreamSettings>,
    /// Pulled from an RTSP server (`transport.rtsp`) instead of pushed.
    pub rtsp: Option<crate::ingest::rtsp::RtspSettings>,
    /// MPEG-TS over SRT (`transport.srt`) instead of RTP.
    pub srt: Option<crate::ingest::srt::SrtSettings>,
    /// The main source of this source's rendition group (`renditionOf`),
    /// when it is a lower rendition of another: it starts received and
    /// repaired but not decoded, until the path policy switches to it.
    pub rendition_of: Option<String>,
    /// How the sender is asked for a bit rate (`bitrateRequest`).
    pub bitrate_request: zerodrop_core::BitrateRequest,
}

/// Where a source's FEC arrives and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FecSource {
    pub scheme: FecScheme,
    /// ST 2022-1: the column and row FEC sockets; ULPFEC: none (in-band).
    pub binds: Vec<SocketAddr>,
    /// ULPFEC: the payload type of FEC packets in the media stream.
    pub payload_type: Option<u8>,
}

impl SourceConfig {
    pub fn id(&self) -> String {
        format!("{}/{}", self.pipeline, self.name)
    }

    /// The name the source is sharded by: its rendition group's main source,
    /// else its own name (see `zerodrop_core::shard::key`).
    pub fn shard_key(&self) -> &str {
        zerodrop_core::shard::key(&self.name, self.rendition_of.as_deref())
    }

    /// Whether an ingest task feeds the source through a local socket
    /// (RTSP, SRT) rather than the worker reading its own UDP sockets.
    pub fn pulled(&self) -> bool {
        self.rtsp.is_some() || self.srt.is_some()
    }

    /// Every UDP socket the source binds: RTP, RTCP unless muxed, and the FEC
    /// sockets when FEC is decoded. Kernel drops on any of them are the
    /// stream's, and no other source may bind any of them.
    pub fn sockets(&self) -> Vec<SocketAddr> {
        if self.rtsp.is_some() {
            // Retina's UDP sockets (RTSP over UDP) are its own, on ports the
            // server and it agree on at each SETUP.
            return Vec::new();
        }
        if let Some(srt) = &self.srt {
            // libsrt's socket: a listener's port is known; a caller's is not.
            return match srt.mode {
                zerodrop_crds::SrtMode::Listener => vec![self.rtp_bind],
                zerodrop_crds::SrtMode::Caller => Vec::new(),
            };
        }
        let mut s = vec![self.rtp_bind];
        s.extend(self.rtcp_bind);
        s.extend(self.fec.iter().flat_map(|f| f.binds.iter().copied()));
        s
    }
}

/// Every RTP source of a pipeline, in spec order.
pub fn sources(pipeline: &StreamPipeline) -> anyhow::Result<Vec<SourceConfig>> {
    let name = pipeline.metadata.name.clone().unwrap_or_else(|| "unnamed".into());
    let spec = &pipeline.spec;
    let mut out = Vec::with_capacity(spec.sources.len());
    for (i, source) in spec.sources.iter().enumerate() {
        let t = &source.transport;
        let pushed = match (&t.rtp, t.rtsp.is_some(), t.srt.is_some()) {
            (Some(rtp), false, false) => Some(rtp),
            (None, true, false) | (None, false, true) => None,
            _ => anyhow::bail!("pipeline {name}: spec.sources[{i}].transport: set exactly one of rtp, rtsp and srt"),
        };
        let ip: IpAddr = match pushed {
            Some(rtp) => rtp.listen_address.parse().with_context(|| {
                format!(
                    "pipeline {name}: spec.sources[{i}].transport.rtp.listenAddress: expected an IP address, got {:?}",
                    rtp.listen_address
                )
            })?,
            None => match &t.srt {
                Some(srt) if srt.mode == zerodrop_crds::SrtMode::Listener => {
                    srt.address.as_deref().unwrap_or("0.0.0.0").parse().with_context(|| {
                        format!("pipeline {name}: spec.sources[{i}].transport.srt.address: expected an IP address to listen on, got {:?}", srt.address)
                    })?
                }
                _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            },
        };
        let srt = match &t.srt {
            Some(s) => {
                anyhow::ensure!(
                    s.mode == zerodrop_crds::SrtMode::Listener || s.address.is_some(),
                    "pipeline {name}: spec.sources[{i}].transport.srt.address: required in caller mode (the sender to call)"
                );
                Some(crate::ingest::srt::SrtSettings {
                    mode: s.mode,
                    address: s.address.clone(),
                    port: s.port,
                    stream_id: s.stream_id.clone(),
                    passphrase: s
                        .passphrase_secret
                        .as_ref()
                        .map(|p| crate::ingest::pulled::SecretSource::Directory(crate::ingest::pulled::mounted_secret_dir(&p.name))),
                    passphrase_key: s.passphrase_secret.as_ref().map_or_else(|| "passphrase".into(), |p| p.key.clone()),
                    latency: Duration::from_millis(spec.repair.latency_ms as u64),
                })
            }
            None => None,
        };
        let rtsp = match &source.transport.rtsp {
            Some(r) => {
                let url = url::Url::parse(&r.url)
                    .with_context(|| format!("pipeline {name}: spec.sources[{i}].transport.rtsp.url: expected an rtsp:// URL, got {:?}", r.url))?;
                anyhow::ensure!(
                    url.scheme() == "rtsp" && url.host().is_some(),
                    "pipeline {name}: spec.sources[{i}].transport.rtsp.url: expected rtsp://host[:port]/path, got {:?}",
                    r.url
                );
                anyhow::ensure!(
                    url.username().is_empty() && url.password().is_none(),
                    "pipeline {name}: spec.sources[{i}].transport.rtsp.url: carries a user name or password; put them in a Secret named by credentialsSecret"
                );
                Some(crate::ingest::rtsp::RtspSettings {
                    url: r.url.clone(),
                    transport: r.lower_transport,
                    video_stream: r.video_stream,
                    timeout: Duration::from_secs(u64::from(r.timeout_seconds.max(1))),
                    credentials: r
                        .credentials_secret
                        .as_ref()
                        .map(|c| crate::ingest::pulled::SecretSource::Directory(crate::ingest::pulled::mounted_secret_dir(&c.name))),
                    username_key: r.credentials_secret.as_ref().map_or_else(|| "username".into(), |c| c.username_key.clone()),
                    password_key: r.credentials_secret.as_ref().map_or_else(|| "password".into(), |c| c.password_key.clone()),
                })
            }
            None => None,
        };
        let fec = match pushed.and_then(|r| r.fec.as_ref()) {
            Some(fec) if spec.repair.fec.enabled => Some(FecSource {
                scheme: fec.scheme,
                binds: fec.ports.iter().map(|&p| SocketAddr::new(ip, p)).collect(),
                payload_type: fec.payload_type,
            }),
            Some(fec) => {
                tracing::info!(
                    pipeline = %name, source = %source.name, scheme = ?fec.scheme,
                    "the source sends FEC but repair.fec.enabled is false: FEC packets are ignored"
                );
                None
            }
            None => None,
        };
        let parameter_sets = match &source.parameter_sets {
            Some(text) => parse_parameter_sets(text, source.codec)
                .with_context(|| format!("pipeline {name}: spec.sources[{i}].parameterSets"))?,
            None => Vec::new(),
        };
        let mut destinations = Vec::new();
        for (k, t) in source.outputs.iter().flat_map(|o| o.restream.iter()).enumerate() {
            let ip: IpAddr = t.address.parse().with_context(|| {
                format!("pipeline {name}: spec.sources[{i}].outputs.restream[{k}].address: expected an IP address, got {:?}", t.address)
            })?;
            let rtcp_port = t.rtcp_port.unwrap_or(t.port.wrapping_add(1)).max(1);
            destinations.push(crate::output::restream::RestreamDestination {
                rtp: SocketAddr::new(ip, t.port),
                rtcp: SocketAddr::new(ip, rtcp_port),
                payload_type: t.payload_type.unwrap_or(source.payload_type),
            });
        }
        let restream = (!destinations.is_empty()).then(|| crate::output::restream::RestreamSettings {
            destinations,
            local_port: source.outputs.as_ref().and_then(|o| o.restream_local_port),
        });
        out.push(SourceConfig {
            pipeline: name.clone(),
            name: source.name.clone(),
            codec: source.codec,
            payload_type: source.payload_type,
            clock_rate: source.clock_rate,
            rtx_payload_type: source.rtx_payload_type,
            rtp_bind: SocketAddr::new(ip, pushed.map(|r| r.port).or(srt.as_ref().map(|s| s.port)).unwrap_or(0)),
            rtcp_bind: pushed.filter(|r| !r.rtcp_mux).map(|r| SocketAddr::new(ip, r.effective_rtcp_port())),
            receive_buffer: pushed
                .and_then(|r| r.receive_buffer_bytes)
                .map_or(DEFAULT_RECEIVE_BUFFER_BYTES, |b| b as usize),
            jitter: JitterSettings {
                latency: Duration::from_millis(spec.repair.latency_ms as u64),
                // Retina sets up RTP/AVP (no feedback), and SRT repairs
                // itself: nobody to ask.
                nack: spec.repair.nack.enabled && pushed.is_some(),
                max_nack_retries: spec.repair.nack.max_retries,
                ..JitterSettings::default()
            },
            decoder: spec.decode.decoder,
            fec,
            parameter_sets,
            hls: spec.outputs.hls.as_ref().map(|h| crate::output::hls::HlsSettings {
                segment: Duration::from_secs(u64::from(h.segment_seconds)),
                window: h.window_segments as usize,
            }),
            frames: spec.outputs.frames.as_ref().map(|f| crate::output::frames::FrameSettings {
                thumbnail_interval: Duration::from_millis(u64::from(f.thumbnail_interval_ms)),
                socket_directory: f.socket_directory.as_ref().map(std::path::PathBuf::from),
            }),
            restream,
            rtsp,
            srt,
            rendition_of: source.rendition_of.clone(),
            bitrate_request: source.bitrate_request,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sets_from_ffmpegs_sdp_are_read_and_bad_ones_named() {
        // `ffmpeg -c:v libx264 -flags +global_header -f rtp`'s sprop-parameter-sets.
        let h264 = parse_parameter_sets("Z0LADdoFB+wEQAAAAwBAAAAPI8UKqA==,aM4PyA==", Codec::H264).unwrap();
        assert_eq!(h264.len(), 2);
        assert_eq!((h264[0][0] & 0x1f, h264[1][0] & 0x1f), (7, 8));
        // libx265's sprop-vps, sprop-sps and sprop-pps joined.
        let h265 = parse_parameter_sets(
            "QAEMAf//AWAAAAMAkAAAAwAAAwA8ugJA,QgEBAWAAAAMAkAAAAwAAAwA8oAoIDxZbpKTC8BaAgAAAAwCAAAAPBA==,RAHAc8GJ",
            Codec::H265,
        )
        .unwrap();
        assert_eq!(h265.len(), 3);
        let err = |text: &str, codec| format!("{:#}", parse_parameter_sets(text, codec).unwrap_err());
        assert!(err("Z0LADdoFB+wEQAAAAwBAAAAPI8UKqA==", Codec::H264).contains("no PPS"));
        assert!(err("Z0LADdoFB+wEQAAAAwBAAAAPI8UKqA==,aM4PyA==", Codec::H265).contains("item 0 is an H.265 NAL unit of type"));
        assert!(err("Z0LADdoFB+wEQAAAAwBAAAAPI8UKqA==,%%%", Codec::H264).contains("item 1 (\"%%%\") is not base64"));
        assert!(err("ZQ==,aM4PyA==", Codec::H264).contains("item 0 is an H.264 NAL unit of type 5"));
    }
}
