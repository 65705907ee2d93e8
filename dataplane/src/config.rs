//! From a validated `StreamPipeline` to what one receiver needs. Pure: the
//! local runner and the pod both go through here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use zerodrop_crds::{Codec, DecoderChoice, FecScheme as CrdFecScheme, StreamPipeline};

use crate::fec::FecScheme;
use crate::jitter::JitterSettings;

/// Receive buffer requested when the spec names none: about 1 s of a
/// 30 Mbit/s stream, so a scheduling hiccup does not overflow the socket.
pub const DEFAULT_RECEIVE_BUFFER: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    pub pipeline: String,
    pub name: String,
    pub codec: Codec,
    pub payload_type: u8,
    pub clock_rate: u32,
    pub rtx_payload_type: Option<u8>,
    pub rtp_bind: SocketAddr,
    /// `None` with rtcp-mux: RTCP shares the RTP socket.
    pub rtcp_bind: Option<SocketAddr>,
    pub receive_buffer: usize,
    pub jitter: JitterSettings,
    pub decoder: DecoderChoice,
    /// FEC to decode: declared by the source and enabled in `repair.fec`.
    pub fec: Option<FecSource>,
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
}

/// Every RTP source of a pipeline, in spec order.
pub fn sources(pipeline: &StreamPipeline) -> anyhow::Result<Vec<SourceConfig>> {
    let name = pipeline.metadata.name.clone().unwrap_or_else(|| "unnamed".into());
    let spec = &pipeline.spec;
    let mut out = Vec::with_capacity(spec.sources.len());
    for (i, source) in spec.sources.iter().enumerate() {
        let rtp = source.transport.rtp.as_ref().with_context(|| {
            format!("pipeline {name}: spec.sources[{i}].transport: only `rtp` is implemented in this version")
        })?;
        let ip: IpAddr = rtp.listen_address.parse().with_context(|| {
            format!(
                "pipeline {name}: spec.sources[{i}].transport.rtp.listenAddress: expected an IP address, got {:?}",
                rtp.listen_address
            )
        })?;
        let fec = match &rtp.fec {
            Some(fec) if spec.repair.fec.enabled => Some(FecSource {
                scheme: match fec.scheme {
                    CrdFecScheme::St2022_1 => FecScheme::St2022_1,
                    CrdFecScheme::Ulpfec => FecScheme::Ulpfec,
                },
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
        out.push(SourceConfig {
            pipeline: name.clone(),
            name: source.name.clone(),
            codec: source.codec,
            payload_type: source.payload_type,
            clock_rate: source.clock_rate,
            rtx_payload_type: source.rtx_payload_type,
            rtp_bind: SocketAddr::new(ip, rtp.port),
            rtcp_bind: (!rtp.rtcp_mux).then(|| SocketAddr::new(ip, rtp.effective_rtcp_port())),
            receive_buffer: rtp.receive_buffer_bytes.map_or(DEFAULT_RECEIVE_BUFFER, |b| b as usize),
            jitter: JitterSettings {
                latency: Duration::from_millis(spec.repair.latency_ms as u64),
                nack: spec.repair.nack.enabled,
                max_nack_retries: spec.repair.nack.max_retries,
                ..JitterSettings::default()
            },
            decoder: spec.decode.decoder,
            fec,
        });
    }
    Ok(out)
}
