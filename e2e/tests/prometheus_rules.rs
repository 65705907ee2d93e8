//! The chart's alert rules under Prometheus' own tools: the PrometheusRule
//! that `helm template` renders (default values, rules enabled) is turned
//! into a plain rules file (its `spec.groups`), which `promtool check rules`
//! must accept, and `promtool test rules` runs the unit tests of
//! `charts/zerodrop/tests/alerts.test.yaml` on it: every alert fires when it
//! should (and not before its `for:`), and stays silent on a healthy
//! pipeline. This test also checks that the unit tests cover every alert the
//! chart renders, both ways.
//!
//! Needs `promtool` (Debian's prometheus package; scripts/install-deps.sh)
//! and `helm` (scripts/controlplane.sh build). Without promtool it skips with
//! a message, except under `CI=true`, where that is a failure.

use std::collections::BTreeSet;
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value as Yaml;
use zerodrop_e2e::prometheus::{render_prometheus_rule, repo, require_tool};

/// The `spec.groups` of the rendered PrometheusRule, as a rules file.
fn rules_file(rendered: &str) -> (String, BTreeSet<String>) {
    let docs: Vec<Yaml> = serde_yaml::Deserializer::from_str(rendered)
        .map(|d| Yaml::deserialize(d).expect("helm renders YAML"))
        .filter(|d| !d.is_null())
        .collect();
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").expect("helm renders a PrometheusRule");
    let groups = rule["spec"]["groups"].clone();
    let alerts = groups
        .as_sequence()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .map(|r| r["alert"].as_str().expect("every rule is an alert").to_owned())
        .collect();
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), groups);
    (serde_yaml::to_string(&file).unwrap(), alerts)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

#[test]
fn every_alert_passes_promtool_check_and_its_unit_tests_fire_and_stay_silent() {
    let Some(promtool) = require_tool("promtool") else { return };
    let (rules, alerts) = rules_file(&render_prometheus_rule(&[]).expect("helm renders the PrometheusRule"));
    assert!(alerts.len() >= 7, "the chart renders alerts: {alerts:?}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("zerodrop-rules.yaml"), &rules).unwrap();
    let tests_src = repo().join("charts/zerodrop/tests/alerts.test.yaml");
    let tests = std::fs::read_to_string(&tests_src).unwrap();
    std::fs::write(dir.path().join("alerts.test.yaml"), &tests).unwrap();

    let checked = run(Command::new(&promtool).args(["check", "rules", "zerodrop-rules.yaml"]).current_dir(dir.path()));
    assert!(checked.contains(&format!("{} rules found", alerts.len())), "{checked}");
    let tested = run(Command::new(&promtool).args(["test", "rules", "alerts.test.yaml"]).current_dir(dir.path()));
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Coverage: each alert fires in some test, and one group (the healthy
    // pipeline) evaluates every alert and expects none.
    let unit: Yaml = serde_yaml::from_str(&tests).unwrap();
    let groups = unit["tests"].as_sequence().expect("tests");
    let mut fires = BTreeSet::new();
    let mut healthy_covers = BTreeSet::new();
    for group in groups {
        let cases = group["alert_rule_test"].as_sequence().cloned().unwrap_or_default();
        let silent = |c: &Yaml| c["exp_alerts"].as_sequence().is_none_or(|a| a.is_empty());
        for case in &cases {
            if !silent(case) {
                fires.insert(case["alertname"].as_str().unwrap().to_owned());
            }
        }
        if !cases.is_empty() && cases.iter().all(silent) {
            let covered: BTreeSet<String> = cases.iter().map(|c| c["alertname"].as_str().unwrap().to_owned()).collect();
            if covered.len() > healthy_covers.len() {
                healthy_covers = covered;
            }
        }
    }
    let never_fired: Vec<&String> = alerts.difference(&fires).collect();
    assert!(never_fired.is_empty(), "alerts no unit test makes fire: {never_fired:?}");
    let never_silent: Vec<&String> = alerts.difference(&healthy_covers).collect();
    assert!(never_silent.is_empty(), "alerts the healthy-pipeline group does not evaluate: {never_silent:?}");
    let unknown: Vec<&String> = fires.union(&healthy_covers).filter(|a| !alerts.contains(*a)).collect();
    assert!(unknown.is_empty(), "unit tests of alerts the chart does not render: {unknown:?}");
}

/// The chart's values reach the rules: a stricter threshold and longer
/// waits render into rules promtool accepts.
#[test]
fn rules_rendered_with_custom_thresholds_pass_promtool_check() {
    let Some(promtool) = require_tool("promtool") else { return };
    let rendered = render_prometheus_rule(&[
        // --set reads 0.001 as a string, which the values schema refuses.
        "--set-json",
        "monitoring.rules.frameDropRatio=0.001",
        "--set",
        "monitoring.rules.frameDropFor=15m,monitoring.rules.streamDownFor=30s",
        "--set",
        "monitoring.rules.alertLabels.team=video",
    ])
    .expect("helm renders the PrometheusRule");
    let (rules, _) = rules_file(&rendered);
    assert!(rules.contains("> 0.001") && rules.contains("15m") && rules.contains("30s") && rules.contains("team: video"), "{rules}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), &rules).unwrap();
    run(Command::new(&promtool).args(["check", "rules", "rules.yaml"]).current_dir(dir.path()));
}
