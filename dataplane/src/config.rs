//! From a validated `StreamPipeline` to what one receiver needs. Pure: the
//! local runner and the pod both go through here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use zerodrop_crds::{Codec, DecoderChoice, StreamPipeline};

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
        if let Some(fec) = &rtp.fec {
            // Accepted by the API for senders that already send it; said
            // loudly so nobody believes it protects the stream yet.
            tracing::warn!(
                pipeline = %name, source = %source.name, scheme = ?fec.scheme, ports = ?fec.ports,
                "FEC is declared but this version does not decode FEC yet: FEC packets are not received,                  loss is repaired by NACK/RTX only"
            );
        }
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
        });
    }
    Ok(out)
}
