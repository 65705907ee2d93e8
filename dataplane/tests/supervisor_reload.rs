//! Applying a new source set restarts only what changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use zerodrop_dataplane::metrics::{Metrics, Readiness};
use zerodrop_dataplane::pod::owned_sources;
use zerodrop_dataplane::supervisor::{Supervisor, SupervisorOptions};

fn pipeline(port_b: u16) -> String {
    format!(
        r#"apiVersion: zerodrop.dev/v1alpha1
kind: StreamPipeline
metadata: {{name: reload}}
spec:
  repair: {{latencyMs: 200}}
  sources:
    - {{name: a, codec: h264, transport: {{rtp: {{listenAddress: 127.0.0.1, port: 24104}}}}}}
    - {{name: b, codec: h264, transport: {{rtp: {{listenAddress: 127.0.0.1, port: {port_b}}}}}}}
"#,
    )
}

fn wait_ready(readiness: &Readiness) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !readiness.is_ready() {
        assert!(Instant::now() < deadline, "receivers not ready: {:?}", readiness.counts());
        std::thread::park_timeout(Duration::from_millis(5));
    }
}

#[test]
fn changing_one_source_restarts_it_alone_and_removing_it_stops_it() {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new());
    let mut sup = Supervisor::new(metrics, readiness.clone(), SupervisorOptions { au_log_dir: None, no_decode: true, workers: 1, published: None });

    let (change, _) = sup.apply(&owned_sources(&pipeline(24106), 0).unwrap());
    assert_eq!(change.started, vec!["reload/a", "reload/b"]);
    wait_ready(&readiness);

    let (change, ended) = sup.apply(&owned_sources(&pipeline(24116), 0).unwrap());
    assert_eq!(change.restarted, vec!["reload/b"]);
    assert_eq!(change.unchanged, vec!["reload/a"]);
    assert!(change.started.is_empty() && change.stopped.is_empty());
    assert_eq!(ended.len(), 1, "the old receiver of b drained and reported");
    assert!(ended[0].1.is_ok());
    wait_ready(&readiness);

    let only_a: Vec<_> = owned_sources(&pipeline(24116), 0).unwrap().into_iter().filter(|s| s.name == "a").collect();
    let (change, _) = sup.apply(&only_a);
    assert_eq!(change.stopped, vec!["reload/b"]);
    assert_eq!(change.unchanged, vec!["reload/a"]);
    assert_eq!(sup.running(), 1);
    let reports = sup.stop_all();
    assert_eq!(reports.len(), 1);
}
