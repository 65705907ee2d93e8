//! The optional signal source: a Prometheus server's HTTP API instead of
//! scraping the pods (`--signal-source prometheus --prometheus-url …`), for
//! clusters where the operator may not reach pod IPs or where Prometheus
//! already scrapes them (the chart's PodMonitor).
//!
//! Each round is one instant query for the series the control loop reads,
//! `pod!=""` so that only series Prometheus attached to a pod are taken (a
//! PodMonitor adds `namespace` and `pod`). The answer is split by
//! (namespace, pod) into the same samples a direct scrape gives, stamped with
//! the time Prometheus scraped them. A pod whose newest sample has not moved
//! since the last round is not a new reading (its counters would give zero
//! deltas that look like "no loss"): it is left out of the round, which the
//! collector records as missing data. Prometheus scrapes every 15–30 s where
//! the pods' direct scrape is 1 s, so with this source the policy reacts at
//! Prometheus' pace: set `--signal-max-age-s` above its scrape interval.

use std::collections::HashMap;

use serde::Deserialize;

use crate::scrape::MetricSample;

/// The series the control loop reads, as one selector.
pub const QUERY: &str = r#"{__name__=~"zerodrop_(worker_busy_seconds_total|rtp_packets_(received|recovered|lost|unrecovered)_total|frames_(decoded|dropped)_total|kernel_udp_drops_total|rendition_index|decoder_info)",pod!=""}"#;

/// Where the Prometheus server is: `http://host[:port][/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrometheusSource {
    pub host: String,
    pub port: u16,
    /// A path prefix (Prometheus behind a proxy, `--web.route-prefix`).
    pub prefix: String,
}

impl PrometheusSource {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--prometheus-url {url:?}: expected http://host[:port][/prefix] (https is not supported)"))?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("--prometheus-url {url:?}: port {p:?} is not a number from 1 to 65535"))?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(format!("--prometheus-url {url:?}: expected http://host[:port][/prefix]"));
        }
        Ok(Self { host: host.to_string(), port, prefix: prefix.to_string() })
    }

    /// The request path of the round's query.
    pub fn query_path(&self) -> String {
        format!("{}/api/v1/query?query={}", self.prefix, percent_encode(QUERY))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One pod's series in Prometheus: the newest scrape time among them (Unix
/// seconds) and the samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSeries {
    pub at_unix: f64,
    pub samples: Vec<MetricSample>,
}

#[derive(Deserialize)]
struct Response {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: HashMap<String, String>,
    /// `[unix seconds, "value"]`.
    value: (f64, String),
}

/// Labels Prometheus adds that the pod did not export.
const TARGET_LABELS: [&str; 7] = ["__name__", "namespace", "pod", "container", "endpoint", "instance", "job"];

/// Splits an instant query's answer by (namespace, pod).
pub fn parse_response(body: &str) -> Result<HashMap<(String, String), PodSeries>, String> {
    let r: Response = serde_json::from_str(body).map_err(|e| format!("not a Prometheus API answer: {e}"))?;
    if r.status != "success" {
        return Err(format!("Prometheus answered {}: {}", r.status, r.error.unwrap_or_default()));
    }
    let data = r.data.ok_or("Prometheus answered without data")?;
    if data.result_type != "vector" {
        return Err(format!("expected an instant vector, got {}", data.result_type));
    }
    let mut out: HashMap<(String, String), PodSeries> = HashMap::new();
    for s in data.result {
        let (Some(name), Some(ns), Some(pod)) = (s.metric.get("__name__"), s.metric.get("namespace"), s.metric.get("pod")) else {
            continue;
        };
        let Ok(value) = s.value.1.parse::<f64>() else { continue };
        let mut labels: Vec<(String, String)> =
            s.metric.iter().filter(|(k, _)| !TARGET_LABELS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.sort();
        let entry = out.entry((ns.clone(), pod.clone())).or_default();
        entry.at_unix = entry.at_unix.max(s.value.0);
        entry.samples.push(MetricSample { name: name.clone(), labels, value });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_and_prefix_and_bad_ones_say_what_was_expected() {
        assert_eq!(
            PrometheusSource::parse("http://prometheus.monitoring:9090").unwrap(),
            PrometheusSource { host: "prometheus.monitoring".into(), port: 9090, prefix: String::new() }
        );
        assert_eq!(PrometheusSource::parse("http://10.0.0.5/prom/").unwrap().prefix, "/prom");
        assert_eq!(PrometheusSource::parse("http://10.0.0.5/prom/").unwrap().port, 80);
        assert_eq!(PrometheusSource::parse("http://[::1]:9090").unwrap().host, "::1");
        assert!(PrometheusSource::parse("https://p:9090").unwrap_err().contains("https is not supported"));
        assert!(PrometheusSource::parse("http://p:ninety").unwrap_err().contains("port \"ninety\""));
        assert!(PrometheusSource::parse("http://:9090").is_err());
    }

    #[test]
    fn the_query_is_percent_encoded() {
        let path = PrometheusSource::parse("http://p:9090").unwrap().query_path();
        assert!(path.starts_with("/api/v1/query?query=%7B__name__%3D~%22zerodrop_"), "{path}");
        assert!(!path[path.find('=').unwrap() + 1..].contains(['{', '"', '|', ' ', '=']), "{path}");
    }

    #[test]
    fn answers_are_split_by_pod_with_prometheus_labels_removed() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"zerodrop_rtp_packets_lost_total","namespace":"video","pod":"fleet-dataplane-0","job":"video/zerodrop-dataplane","instance":"10.1.0.7:9464","pipeline":"fleet","stream":"a"},"value":[1700000010.5,"12"]},
            {"metric":{"__name__":"zerodrop_worker_busy_seconds_total","namespace":"video","pod":"fleet-dataplane-0","worker":"0"},"value":[1700000011.0,"3.25"]},
            {"metric":{"__name__":"zerodrop_rtp_packets_lost_total","namespace":"video","pod":"fleet-dataplane-1","pipeline":"fleet","stream":"b"},"value":[1700000009.0,"NaN"]},
            {"metric":{"__name__":"zerodrop_rtp_packets_lost_total","pipeline":"fleet","stream":"c"},"value":[1700000009.0,"4"]}
        ]}}"#;
        let pods = parse_response(body).unwrap();
        let p0 = &pods[&("video".to_string(), "fleet-dataplane-0".to_string())];
        assert_eq!(p0.at_unix, 1700000011.0, "the newest scrape of the pod");
        assert_eq!(p0.samples.len(), 2);
        let lost = p0.samples.iter().find(|s| s.name == "zerodrop_rtp_packets_lost_total").unwrap();
        assert_eq!(lost.labels, vec![("pipeline".to_string(), "fleet".to_string()), ("stream".to_string(), "a".to_string())]);
        assert_eq!(lost.value, 12.0);
        // NaN parses as a float: a pod that exported it gives that value; a series without a pod is not a pod's.
        assert_eq!(pods.len(), 2);
        assert!(parse_response(r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#).unwrap_err().contains("parse error"));
        assert!(parse_response("<html>").unwrap_err().contains("not a Prometheus API answer"));
    }
}
