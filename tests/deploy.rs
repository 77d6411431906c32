//! The deploy kit against the real binaries: every metric the Grafana dashboard queries is
//! exported by a running agent (or, for `shoal_tracker_` metrics, a running tracker).

use std::collections::BTreeSet;
use std::path::Path;

use shoal_tests::{Agent, AgentOptions, Tracker, TrackerOptions};

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
async fn grafana_dashboard_queries_only_exported_metrics() {
    let queried = dashboard_metrics();
    let (tracker_queried, agent_queried): (BTreeSet<String>, BTreeSet<String>) =
        queried.into_iter().partition(|m| m.starts_with("shoal_tracker_"));
    assert!(agent_queried.len() >= 5, "the dashboard should chart the agent: {agent_queried:?}");
    assert!(tracker_queried.len() >= 4, "the dashboard should chart the tracker: {tracker_queried:?}");

    let agent = Agent::start(AgentOptions::new()).await.expect("start agent");
    let text = agent.metrics_text().await.expect("scrape the agent's /metrics");
    let names = exported(&text);
    let missing: Vec<&String> = agent_queried.iter().filter(|m| !names.contains(*m)).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics no agent exports: {missing:?}\n{text}");

    let tracker = Tracker::start(TrackerOptions::new()).await.expect("start tracker");
    let text = tracker.metrics_text().await.expect("scrape the tracker's /metrics");
    let names = exported(&text);
    let missing: Vec<&String> = tracker_queried.iter().filter(|m| !names.contains(*m)).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics no tracker exports: {missing:?}\n{text}");
}

/// `shoal-agent containerd-config` against a real containerd: the hosts.toml it writes sends
/// `ctr content fetch` through the agent; running it twice changes nothing; `--restore` brings
/// the operator's own file back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_config_wires_containerd_to_the_agent_and_restores() {
    use shoal_tests::{run_agent_expecting_exit, Containerd, ImageKind, ImageSpec, Origin};
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    let origin = Origin::start().await.expect("start origin");
    let image = origin.push(&ImageSpec::new(ImageKind::OciManifest, "deploy/app", "v1")).await.expect("push");
    let agent = Agent::start(AgentOptions::new().upstream(&origin.host(), &origin.url())).await.unwrap();
    let ctd = Containerd::start().await.expect("start containerd");
    let hosts = ctd.scratch_dir("certs.d").unwrap();

    // The operator's own file, which the tool must keep.
    let registry_dir = hosts.join(origin.host());
    std::fs::create_dir_all(&registry_dir).unwrap();
    let theirs = format!("server = \"http://{}\"\n# operator's file\n", origin.host());
    std::fs::write(registry_dir.join("hosts.toml"), &theirs).unwrap();

    let run = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "containerd-config".into(),
            "--hosts-dir".into(),
            hosts.display().to_string(),
            "--registries".into(),
            origin.host(),
            "--mirror".into(),
            agent.url(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        async move {
            run_agent_expecting_exit(&args, Duration::from_secs(10)).await.expect("containerd-config runs")
        }
    };

    // Without --force it refuses to clobber a file it did not write, and changes nothing.
    let refused = run(&[]).await;
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(refused.stderr.contains("hosts.toml"), "{}", refused.stderr);
    assert_eq!(std::fs::read_to_string(registry_dir.join("hosts.toml")).unwrap(), theirs);

    let wrote = run(&["--force"]).await;
    assert!(wrote.status.success(), "{}", wrote.stderr);
    let ours = std::fs::read(registry_dir.join("hosts.toml")).unwrap();
    let meta = std::fs::metadata(registry_dir.join("hosts.toml")).unwrap();

    // The written file makes containerd pull through the agent: its `server` is the origin
    // over https, which this plain-HTTP origin cannot answer.
    ctd.fetch(&image.reference(), &hosts, &[])
        .await
        .expect("ctr content fetch via containerd-config's hosts.toml");
    ctd.verify_image(&image).await.expect("fetched content");
    let served = agent.metric_value("shoal_served_bytes_total", &[]).await.unwrap().unwrap_or(0.0);
    assert!(served >= image.total_blob_bytes() as f64, "agent served {served} bytes");

    // Idempotent: a second run leaves bytes, inode and mtime alone.
    let again = run(&["--force"]).await;
    assert!(again.status.success(), "{}", again.stderr);
    let meta2 = std::fs::metadata(registry_dir.join("hosts.toml")).unwrap();
    assert_eq!(std::fs::read(registry_dir.join("hosts.toml")).unwrap(), ours);
    assert_eq!(
        (meta.ino(), meta.mtime(), meta.mtime_nsec()),
        (meta2.ino(), meta2.mtime(), meta2.mtime_nsec())
    );

    // --restore brings the operator's file back byte for byte.
    let restored = run(&["--restore"]).await;
    assert!(restored.status.success(), "{}", restored.stderr);
    assert_eq!(std::fs::read_to_string(registry_dir.join("hosts.toml")).unwrap(), theirs);
    let left: Vec<_> = std::fs::read_dir(&registry_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "only the operator's file is left: {left:?}");
}
