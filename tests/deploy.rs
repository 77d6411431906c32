//! The deploy kit against the real binaries: every metric the Grafana dashboard queries is
//! exported by a running agent.

use std::collections::BTreeSet;
use std::path::Path;

use shoal_tests::{Agent, AgentOptions};

/// Every `shoal_...` name in the dashboard's `expr` fields.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/shoal-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    let mut names = BTreeSet::new();
    for expr in exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while let Some(pos) = expr[i..].find("shoal_") {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            let preceded_by_ident =
                start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            if !preceded_by_ident {
                names.insert(expr[start..end].to_string());
            }
            i = end;
        }
    }
    names
}

/// Metric names a Prometheus text exposition offers: sample names, plus `_total` for every
/// counter family (a labelled family with no samples yet shows only its `# TYPE` line).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                if kind == "counter" {
                    names.insert(format!("{name}_total"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_exported_agent_metrics() {
    let queried = dashboard_metrics();
    assert!(queried.len() >= 5, "the dashboard should chart the agent: {queried:?}");
    let agent = Agent::start(AgentOptions::new()).await.expect("start agent");
    let text = agent.metrics_text().await.expect("scrape /metrics");
    let exported = exported(&text);
    let missing: Vec<&String> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics no agent exports: {missing:?}\n{text}");
}
