//! The UDP ports a pushed RTP source listens on. The pod spec's container
//! ports, the per-source Service, the sockets the data plane binds, the
//! port-clash checks and the attribution of kernel drops to streams all ask
//! this one type, so none of them can forget the FEC ports.

/// A source's ports as the manifest gives them (`transport.rtp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePorts {
    /// RTP media.
    pub rtp: u16,
    /// An explicit RTCP port (`rtcpPort`).
    pub rtcp: Option<u16>,
    /// RTCP on the RTP port itself (RFC 5761).
    pub rtcp_mux: bool,
    /// FEC on ports of their own (ST 2022-1: column, row).
    pub fec: Vec<u16>,
}

/// What a port is for, as the Service names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRole {
    Rtp,
    Rtcp,
    /// The FEC port at this index of `fec.ports`.
    Fec(usize),
}

impl PortRole {
    /// The port's name in a Service or a pod's container ports (at most 15
    /// characters, as Kubernetes requires).
    pub fn name(self) -> String {
        match self {
            PortRole::Rtp => "rtp".into(),
            PortRole::Rtcp => "rtcp".into(),
            PortRole::Fec(i) => format!("fec-{i}"),
        }
    }
}

impl SourcePorts {
    /// The port RTCP arrives on and leaves from: the RTP port with rtcp-mux,
    /// else the explicit one, else RTP + 1 (RFC 3550 §11).
    pub fn rtcp_port(&self) -> u16 {
        if self.rtcp_mux { self.rtp } else { self.rtcp.unwrap_or(self.rtp.saturating_add(1)) }
    }

    /// Every socket the source binds, with what it is for: RTP, RTCP unless
    /// muxed, then each FEC port. Each port appears once.
    pub fn roles(&self) -> Vec<(PortRole, u16)> {
        let mut out = vec![(PortRole::Rtp, self.rtp)];
        if !self.rtcp_mux {
            out.push((PortRole::Rtcp, self.rtcp_port()));
        }
        for (i, &p) in self.fec.iter().enumerate() {
            if out.iter().all(|&(_, q)| q != p) {
                out.push((PortRole::Fec(i), p));
            }
        }
        out
    }

    /// Every UDP port the source listens on: kernel drops on any of them are
    /// the stream's, and no other source may use any of them.
    pub fn all(&self) -> Vec<u16> {
        self.roles().into_iter().map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(rtcp: Option<u16>, rtcp_mux: bool, fec: &[u16]) -> SourcePorts {
        SourcePorts { rtp: 5000, rtcp, rtcp_mux, fec: fec.to_vec() }
    }

    #[test]
    fn rtcp_is_the_next_port_unless_given_or_muxed() {
        assert_eq!(ports(None, false, &[]).rtcp_port(), 5001);
        assert_eq!(ports(Some(6000), false, &[]).rtcp_port(), 6000);
        assert_eq!(ports(Some(6000), true, &[]).rtcp_port(), 5000);
        assert_eq!(SourcePorts { rtp: u16::MAX, rtcp: None, rtcp_mux: false, fec: vec![] }.rtcp_port(), u16::MAX);
    }

    #[test]
    fn every_port_includes_the_fec_ports_and_muxed_rtcp_only_once() {
        assert_eq!(ports(None, false, &[5002, 5004]).all(), vec![5000, 5001, 5002, 5004]);
        assert_eq!(ports(None, true, &[5002, 5004]).all(), vec![5000, 5002, 5004]);
        let roles = ports(None, false, &[5002, 5004]).roles();
        let names: Vec<String> = roles.iter().map(|(r, _)| r.name()).collect();
        assert_eq!(names, ["rtp", "rtcp", "fec-0", "fec-1"]);
    }
}
