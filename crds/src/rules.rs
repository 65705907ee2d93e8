//! The CEL rules (`x-kubernetes-validations`) of the `StreamPipeline` schema, and
//! a schema transform that keeps the generated OpenAPI within what Kubernetes
//! understands.
//!
//! Each function returns the rule list for one schema node; the types attach
//! them with `#[schemars(extend("x-kubernetes-validations" = rules::...()))]`.
//! The apiserver evaluates them on admission, and [`crate::parse_manifests`]
//! evaluates the very same rules locally (kube's `cel` feature), so this file
//! is the single source of truth for cross-field validation.
//!
//! Every message names the field it is about, because a user reads it in
//! `kubectl apply` output or `zerodrop run` output without the schema at hand.

use schemars::Schema;
use serde_json::{Value, json};

/// Most sources a pipeline may hold. The apiserver bounds each rule's cost,
/// estimated from `maxItems` when the CRD is created and measured at run time
/// (1M units per rule and call). The listen-port rule is quadratic in the
/// number of ports: 128 sources with RTP, RTCP and two FEC ports each cost
/// about 570k units on kube-apiserver 1.35, 256 sources exceed the limit.
/// Larger fleets are split into several pipelines.
pub const MAX_SOURCES: usize = 128;

/// Most per-stream entries `status.streams` carries; `status.streamCount`
/// still counts them all and `status.streamsTruncated` says when the list
/// was cut. Keeps the status object far below etcd's object size limit.
pub use zerodrop_core::limits::MAX_STREAM_STATUSES;

/// Longest source or rendition name: a DNS-1123 label.
pub const MAX_NAME_LENGTH: usize = 63;

/// The RFC 3551 dynamic payload type range, the only one H.264/H.265 may use.
pub const DYNAMIC_PAYLOAD_TYPES: std::ops::RangeInclusive<u8> = 96..=127;

fn rule(rule: &str, message: &str, field_path: Option<&str>) -> Value {
    let mut r = json!({ "rule": rule, "message": message });
    if let Some(path) = field_path {
        r["fieldPath"] = json!(path);
    }
    r
}

const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Rules on `spec.sources[*].name`.
pub fn source_name() -> Value {
    json!([rule(
        &format!("self.matches('{DNS_LABEL}')"),
        "source name must be a DNS-1123 label: lowercase letters, digits and '-', \
         starting and ending with a letter or digit (it names the source's Service and metrics)",
        None,
    )])
}

/// Rules on `spec.bitratePolicy.renditions[*].name`.
pub fn rendition_name() -> Value {
    json!([rule(
        &format!("self.matches('{DNS_LABEL}')"),
        "rendition name must be a DNS-1123 label: lowercase letters, digits and '-', \
         starting and ending with a letter or digit",
        None,
    )])
}

/// The UDP ports one source listens on, as a CEL list expression over the
/// source bound to `s`: RTP, RTCP unless muxed (explicit `rtcpPort`, else
/// `port + 1` as RFC 3550 §11 says; see `RtpTransport::effective_rtcp_port`),
/// and the FEC ports. Only meaningful when `s.transport.rtp` is set.
fn listen_ports_of(s: &str) -> String {
    let rtp = format!("{s}.transport.rtp");
    format!(
        "([{rtp}.port] \
         + ((has({rtp}.rtcpMux) && {rtp}.rtcpMux) ? [] : [has({rtp}.rtcpPort) ? {rtp}.rtcpPort : {rtp}.port + 1]) \
         + ((has({rtp}.fec) && has({rtp}.fec.ports)) ? {rtp}.fec.ports : []))"
    )
}

/// Every UDP listen port of the pipeline, as one CEL list over the sources
/// list bound to `self`: RTP ports, then RTCP ports, then FEC ports. Built
/// from fixed slots because CEL in Kubernetes has no `flatten` that kube-cel
/// also evaluates.
fn all_listen_ports() -> String {
    let rtp = "has(s.transport.rtp)";
    let fec = "has(s.transport.rtp) && has(s.transport.rtp.fec) && has(s.transport.rtp.fec.ports)";
    format!(
        "self.filter(s, {rtp}).map(s, s.transport.rtp.port) \
         + self.filter(s, {rtp} && !(has(s.transport.rtp.rtcpMux) && s.transport.rtp.rtcpMux))\
               .map(s, has(s.transport.rtp.rtcpPort) ? s.transport.rtp.rtcpPort : s.transport.rtp.port + 1) \
         + self.filter(s, {fec} && s.transport.rtp.fec.ports.size() > 0).map(s, s.transport.rtp.fec.ports[0]) \
         + self.filter(s, {fec} && s.transport.rtp.fec.ports.size() > 1).map(s, s.transport.rtp.fec.ports[1])"
    )
}

/// Rules on `spec.sources` (the list itself).
pub fn source_list() -> Value {
    // Comparing every pair of sources, building both port lists each time,
    // costs too much for the apiserver (its run-time limit per rule is 1M
    // cost units; 64 sources with FEC exceeded it). So the rule builds the
    // list of all listen ports once and looks for duplicates in it.
    // `[x].all(l, f(l))` evaluates x once and names it l, as `cel.bind` would
    // (kube-cel does not support `cel.bind`).
    let ports = all_listen_ports();
    let explanation = "the RTP, RTCP (port + 1 unless rtcpPort or rtcpMux is set) and FEC ports \
                       of the sources must all differ";
    // The message names the first and the last source that listen on the
    // first duplicated port. It cannot print the port: the apiserver
    // estimates the size of string(int) as unbounded, and so the cost of any
    // concatenation with it. Names are read from `self` by index, where
    // maxLength bounds their size (a `filter` result or a `join` is
    // estimated as unbounded too).
    let users = format!(
        "self.map(s, has(s.transport.rtp) && d in {})",
        listen_ports_of("s")
    );
    let first = format!("self[{users}.indexOf(true)].name");
    let last = format!("self[{users}.lastIndexOf(true)].name");
    let mut rules = vec![json!({
        "rule": format!("[{ports}].all(l, l.all(p, l.indexOf(p) == l.lastIndexOf(p)))"),
        "message": format!("a UDP listen port is used more than once: {explanation}"),
        "messageExpression": format!(
            "[{ports}].map(l, l.filter(p, l.indexOf(p) != l.lastIndexOf(p))[0]).map(d, \
               ({users}.indexOf(true) == {users}.lastIndexOf(true) \
                 ? 'source ' + {first} + ' uses one UDP port twice' \
                 : 'sources ' + {first} + ' and ' + {last} + ' listen on the same UDP port') \
               + ': {explanation}')[0]"
        ),
    })];
    rules.extend(rendition_groups());
    Value::Array(rules)
}

/// Most sources in one rendition group: the main source and up to 15
/// sources naming it in `renditionOf` (as many as a bitrate ladder holds).
pub const MAX_RENDITION_GROUP: usize = 16;

/// Rules on `spec` as a whole.
pub fn spec() -> Value {
    json!([rule(
        "!self.sources.exists(s, has(s.renditionOf)) || has(self.bitratePolicy)",
        "bitratePolicy is required when a source sets renditionOf: its downgradeLossPercent, \
         downgradeWindowSeconds and upgradeAfterSeconds decide when a rendition group switches",
        Some(".bitratePolicy"),
    )])
}

/// Rules on the rendition groups (`renditionOf`) across `spec.sources`.
/// Each failed rule names the first source that breaks it, read from `self`
/// by index (see [`source_list`] on why not from a `filter`).
fn rendition_groups() -> Vec<Value> {
    let named = |cond: &str| {
        format!("self[self.map(s, {cond}).indexOf(true)].name")
    };
    let unknown = "has(s.renditionOf) && !self.exists(m, m.name == s.renditionOf)";
    // Naming itself is the per-source rule's to report, not this one's.
    let chained = "has(s.renditionOf) && s.renditionOf != s.name \
                   && self.exists(m, m.name == s.renditionOf && has(m.renditionOf))";
    let crowded = format!(
        "!has(s.renditionOf) && self.filter(r, has(r.renditionOf) && r.renditionOf == s.name).size() > {}",
        MAX_RENDITION_GROUP - 1
    );
    vec![
        json!({
            "rule": format!("!self.exists(s, {unknown})"),
            "message": "renditionOf must name another source of this pipeline (the main stream of the group)",
            "messageExpression": format!(
                "'source ' + {} + ': renditionOf must name another source of this pipeline (the main stream of the group)'",
                named(unknown)
            ),
        }),
        json!({
            "rule": format!("!self.exists(s, {chained})"),
            "message": "renditionOf must name a main source, one without renditionOf of its own (one level of renditions)",
            "messageExpression": format!(
                "'source ' + {} + ': renditionOf must name a main source, one without renditionOf of its own (one level of renditions)'",
                named(chained)
            ),
        }),
        json!({
            "rule": format!("!self.exists(s, {crowded})"),
            "message": format!("a rendition group holds at most {MAX_RENDITION_GROUP} sources: the main source and {} naming it in renditionOf", MAX_RENDITION_GROUP - 1),
            "messageExpression": format!(
                "'source ' + {} + ': a rendition group holds at most {MAX_RENDITION_GROUP} sources: the main source and {} naming it in renditionOf'",
                named(&crowded), MAX_RENDITION_GROUP - 1
            ),
        }),
    ]
}

/// Rules on one `spec.sources[*]` entry.
pub fn source() -> Value {
    json!([
        rule(
            "!has(self.renditionOf) || self.renditionOf != self.name",
            "renditionOf must name another source, not the source itself",
            Some(".renditionOf"),
        ),
        rule(
            "!has(self.rtxPayloadType) || self.rtxPayloadType != self.payloadType",
            "rtxPayloadType must differ from payloadType: RTX retransmissions (RFC 4588) \
             need a payload type of their own",
            Some(".rtxPayloadType"),
        ),
        rule(
            "!has(self.transport.rtp) || !has(self.transport.rtp.fec) || !has(self.transport.rtp.fec.payloadType) \
             || (self.transport.rtp.fec.payloadType != self.payloadType \
                 && (!has(self.rtxPayloadType) || self.transport.rtp.fec.payloadType != self.rtxPayloadType))",
            "transport.rtp.fec.payloadType must differ from payloadType and rtxPayloadType",
            Some(".transport.rtp.fec.payloadType"),
        ),
        rule(
            "self.clockRate == 90000",
            "clockRate must be 90000: H.264 (RFC 6184) and H.265 (RFC 7798) over RTP use a 90 kHz clock",
            Some(".clockRate"),
        ),
    ])
}

/// Rules on `spec.sources[*].transport`.
pub fn transport() -> Value {
    // Written as a count so that adding a member (srt, rtsp) is one more entry.
    json!([rule(
        "[has(self.rtp), has(self.rtsp), has(self.srt)].filter(set, set).size() == 1",
        "transport must set exactly one member: rtp, rtsp or srt",
        None,
    )])
}

/// Rules on `spec.sources[*].transport.srt`.
pub fn srt_transport() -> Value {
    json!([
        rule(
            "!has(self.mode) || self.mode != 'caller' || has(self.address)",
            "srt.address is required in caller mode: the host or IP address of the sender to call",
            Some(".address"),
        ),
        rule(
            "!has(self.mode) || self.mode == 'caller' || !has(self.address) || isIP(self.address)",
            "srt.address must be an IP address to listen on in listener mode, such as 0.0.0.0",
            Some(".address"),
        ),
    ])
}

/// Rules on `spec.sources[*].transport.rtsp.url`.
pub fn rtsp_url() -> Value {
    json!([
        rule(
            "self.startsWith('rtsp://')",
            "url must be an rtsp:// URL, such as rtsp://10.1.2.3:554/stream1",
            None,
        ),
        rule(
            "!self.matches('^rtsp://[^/]*@')",
            "url must not carry a user name or password: put them in a Secret and name it in \
             credentialsSecret",
            None,
        ),
    ])
}

/// Rules on `spec.sources[*].transport.rtp`.
pub fn rtp_transport() -> Value {
    let mux = "(has(self.rtcpMux) && self.rtcpMux)";
    let rtcp =
        format!("({mux} ? self.port : (has(self.rtcpPort) ? self.rtcpPort : self.port + 1))");
    json!([
        rule(
            &format!("!(has(self.rtcpPort) && {mux})"),
            "rtcpPort and rtcpMux are mutually exclusive: with rtcpMux, RTCP shares the RTP port",
            Some(".rtcpPort"),
        ),
        rule(
            "!has(self.rtcpPort) || self.rtcpPort != self.port",
            "rtcpPort must differ from port; set rtcpMux: true to carry RTCP on the RTP port",
            Some(".rtcpPort"),
        ),
        rule(
            &format!("self.port < 65535 || has(self.rtcpPort) || {mux}"),
            "port 65535 leaves no room for the implicit RTCP port (port + 1): set rtcpPort or rtcpMux",
            Some(".port"),
        ),
        rule(
            &format!(
                "!has(self.fec) || !has(self.fec.ports) || self.fec.ports.all(p, p != self.port && p != {rtcp})"
            ),
            "fec.ports must differ from port and from the RTCP port (port + 1 unless rtcpPort or rtcpMux is set)",
            Some(".fec.ports"),
        ),
    ])
}

/// Rules on `spec.sources[*].transport.rtp.listenAddress`.
pub fn listen_address() -> Value {
    json!([rule(
        "isIP(self)",
        "listenAddress must be an IPv4 or IPv6 address, such as 0.0.0.0, 127.0.0.1 or ::",
        None,
    )])
}

/// Rules on `spec.sources[*].outputs.restream[*].address`.
pub fn restream_address() -> Value {
    json!([rule("isIP(self)", "address must be an IPv4 or IPv6 address, such as 10.0.0.5 or fd00::5", None)])
}

/// Rules on `spec.sources[*].transport.rtp.fec`.
pub fn fec_transport() -> Value {
    json!([
        rule(
            "self.scheme != 'st2022-1' || (has(self.ports) && self.ports.size() == 2)",
            "fec.scheme st2022-1 needs exactly 2 ports: [column port, row port]",
            Some(".ports"),
        ),
        rule(
            "self.scheme != 'ulpfec' || has(self.payloadType)",
            "fec.scheme ulpfec needs payloadType: ULPFEC (RFC 5109) travels in the RTP stream \
             under a payload type of its own",
            Some(".payloadType"),
        ),
        rule(
            "self.scheme != 'ulpfec' || !has(self.ports) || self.ports.size() == 0",
            "fec.scheme ulpfec travels in-band with the media: leave fec.ports empty",
            Some(".ports"),
        ),
    ])
}

/// Rules on `spec.scaling`.
pub fn scaling() -> Value {
    json!([rule(
        "self.maxReplicas >= self.minReplicas",
        "scaling.maxReplicas must be greater than or equal to scaling.minReplicas",
        Some(".maxReplicas"),
    )])
}

/// Rules on `spec.bitratePolicy`.
pub fn bitrate_policy() -> Value {
    // A CEL rule rather than a schema minimum: the apiserver compares an
    // integer value with a fractional minimum after truncating the minimum,
    // so `minimum: 0.01` would let 0 through.
    json!([rule(
        "self.downgradeLossPercent > 0.0",
        "bitratePolicy.downgradeLossPercent must be greater than 0",
        Some(".downgradeLossPercent"),
    )])
}

/// Rules on `spec.bitratePolicy.renditions`.
pub fn renditions() -> Value {
    json!([rule(
        "self.map(r, -r.bitrateKbps).isSorted() && self.all(a, self.exists_one(b, b.bitrateKbps == a.bitrateKbps))",
        "bitratePolicy.renditions must be ordered from the highest to the lowest bitrateKbps, \
         each bitrate different",
        None,
    )])
}

/// Schema transform for the top-level spec and status, which makes the
/// generated OpenAPI read well in Kubernetes:
/// - removes the `uint8`/`uint16`/`uint32`/`uint64` formats schemars writes
///   for unsigned integers: Kubernetes does not know them (the apiserver warns
///   about unknown formats), and the `minimum`/`maximum` beside them already
///   carry the range;
/// - joins the lines of each paragraph of a description (doc comments wrap at
///   100 columns; `kubectl explain` wraps by itself).
pub fn kubernetes_openapi(schema: &mut Schema) {
    fn rewrite(value: &mut Value) {
        match value {
            Value::Object(map) => {
                if map
                    .get("format")
                    .and_then(Value::as_str)
                    .is_some_and(|f| f.starts_with("uint"))
                {
                    map.remove("format");
                }
                if let Some(Value::String(text)) = map.get_mut("description") {
                    *text = unwrap_paragraphs(text);
                }
                // "default" and "enum" hold data, not schemas.
                for (key, child) in map.iter_mut() {
                    if !matches!(
                        key.as_str(),
                        "default" | "enum" | "x-kubernetes-validations" | "description"
                    ) {
                        rewrite(child);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(rewrite),
            _ => {}
        }
    }
    if let Some(map) = schema.as_object_mut() {
        let mut value = Value::Object(std::mem::take(map));
        rewrite(&mut value);
        if let Value::Object(rewritten) = value {
            *map = rewritten;
        }
    }
}

/// Joins the lines within each paragraph; paragraphs stay separated by a blank line.
fn unwrap_paragraphs(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}
