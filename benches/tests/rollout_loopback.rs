//! The rollout harness keeps working: `rollout --loopback` with three nodes and an 8 MiB image
//! (real origin, real containerd per node, real agents), checked through its JSON output.
//!
//! Needs what the integration tests need (`docker-registry`, `containerd`, `skopeo`) and the
//! agent binary (`cargo build --workspace --bins`). Also, when run as root with `ip` and `tc`
//! available: a namespaced run interrupted with SIGINT mid-pull removes every namespace it made.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_shoal-benches");

fn run_rollout(args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(EXE).arg("rollout").args(args).stdin(Stdio::null()).output().expect("run shoal-benches");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn scenario<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["scenarios"]
        .as_array()
        .expect("scenarios array")
        .iter()
        .find(|s| s["scenario"] == name)
        .unwrap_or_else(|| panic!("no {name} scenario in {report:#}"))
}

#[test]
fn loopback_rollout_pulls_on_every_node_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let started = Instant::now();
    let (ok, stdout, stderr) = run_rollout(&[
        "--loopback",
        "--nodes",
        "3",
        "--image",
        "8MiB",
        "--layers",
        "2",
        "--scenario",
        "direct,dht,tracker",
        "--timeout-secs",
        "120",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "rollout failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(90), "took {:?}", started.elapsed());

    let report: Value = serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(report["mode"], "loopback");
    assert_eq!(report["nodes"], 3);
    assert_eq!(report["t_min_s"], Value::Null, "no rates in loopback mode, so no T_min");
    let image_bytes = report["image_bytes"].as_u64().unwrap();
    // 8 MiB of layers plus the config and the manifest.
    assert!(image_bytes > 8 << 20 && image_bytes < (8 << 20) + 4096, "image bytes {image_bytes}");

    // The tracker scenario runs wherever `shoal-tracker` was built next to this binary (as
    // `cargo build --workspace --bins` does); otherwise it must say why it was skipped.
    let tracker_built = Path::new(EXE).with_file_name("shoal-tracker").is_file();
    let tracker = scenario(&report, "tracker");
    if !tracker_built {
        assert!(tracker["skipped"].as_str().is_some_and(|s| s.contains("shoal-tracker")), "{tracker:#}");
    }
    let ran: &[&str] = if tracker_built { &["direct", "dht", "tracker"] } else { &["direct", "dht"] };
    for &name in ran {
        let s = scenario(&report, name);
        assert_eq!(s["skipped"], Value::Null, "{name} skipped: {s:#}");
        assert_eq!((s["completed"].as_u64(), s["pulls"].as_u64()), (Some(3), Some(3)), "{name}: {s:#}");
        let run = &s["runs"][0];
        assert_eq!(run["errors"].as_array().unwrap().len(), 0, "{name}: {run:#}");
        let times: Vec<f64> =
            run["node_seconds"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
        assert_eq!(times.len(), 3);
        assert!(times.iter().all(|t| *t > 0.0 && *t < 120.0), "{name}: {times:?}");
        let max = times.iter().copied().fold(0.0, f64::max);
        assert_eq!(s["max_s"].as_f64(), Some(max), "{name}: max is the slowest node");
        assert!(s["p50_s"].as_f64().unwrap() <= max);
        // Loopback: egress comes from the origin's access log, no interface counter.
        assert_eq!(run["origin_wire_bytes"], Value::Null);
    }
    // Without agents every node fetches every byte from the origin: three copies, exactly
    // (access-log bytes are response bodies).
    let direct = scenario(&report, "direct")["egress_ratio"].as_f64().unwrap();
    assert!((direct - 3.0).abs() < 0.01, "direct egress ratio {direct}");
    // With agents the origin sends at least one copy and clearly less than three.
    for &name in &ran[1..] {
        let ratio = scenario(&report, name)["egress_ratio"].as_f64().unwrap();
        assert!((0.99..2.5).contains(&ratio), "{name} egress ratio {ratio}");
    }
    let speedup = scenario(&report, "direct")["speedup_vs_direct"].as_f64().unwrap();
    assert!((speedup - 1.0).abs() < 1e-9, "direct against itself: {speedup}");

    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "not an SVG: {svg:.200}");
    assert_eq!(svg.matches("<path d=\"M").count(), 2 + ran.len(), "two axes and a CDF curve per scenario");
    for name in ran {
        assert!(stdout.contains(&format!("| {name} | 3/3 |")), "table:\n{stdout}");
    }
}

/// `--kill coordinator` in the dht scenario kills the agent the layer's coordinator is (and
/// that node's client) mid-pull; the other nodes complete, and the report says what died.
#[test]
fn a_killed_coordinator_is_reported_and_the_others_complete() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let (ok, stdout, stderr) = run_rollout(&[
        "--loopback",
        "--nodes",
        "4",
        "--image",
        "24MiB",
        "--layers",
        "1",
        "--scenario",
        "dht",
        "--kill",
        "coordinator",
        "--kill-after",
        "0.2",
        "--timeout-secs",
        "120",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "rollout failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    let dht = scenario(&report, "dht");
    assert_eq!((dht["completed"].as_u64(), dht["pulls"].as_u64()), (Some(3), Some(3)), "{dht:#}");
    assert_eq!(dht["killed"].as_u64(), Some(1), "{dht:#}");
    let run = &dht["runs"][0];
    assert_eq!(run["errors"].as_array().unwrap().len(), 0, "{run:#}");
    let killed = &run["killed"][0];
    let victim = killed["node"].as_u64().expect("a node was killed") as usize;
    assert!(killed["what"].as_str().unwrap().contains("coordinator of sha256:"), "{killed:#}");
    assert_eq!(run["node_seconds"][victim], Value::Null, "the killed node has no completion time");
    assert!(stdout.contains("| dht | 3/3 (+1 killed) |"), "table:\n{stdout}");
}

#[test]
fn bad_arguments_fail_clearly() {
    let (ok, _, stderr) = run_rollout(&["--loopback", "--nodes", "0"]);
    assert!(!ok && stderr.contains("--nodes must be"), "{stderr}");
    let (ok, _, stderr) = run_rollout(&["--loopback", "--node-rate", "fast"]);
    assert!(!ok && stderr.contains("expected e.g. 200mbit"), "{stderr}");
    let (ok, _, stderr) = run_rollout(&["--loopback", "--scenario", "bittorrent"]);
    assert!(!ok && stderr.contains("invalid value"), "{stderr}");
    let (ok, _, stderr) = run_rollout(&["--loopback", "--kill", "everyone"]);
    assert!(!ok && stderr.contains("expected `coordinator` or a number"), "{stderr}");
    let (ok, _, stderr) = run_rollout(&["--loopback", "--nodes", "3", "--kill", "3"]);
    assert!(!ok && stderr.contains("must survive"), "{stderr}");
    let (ok, _, stderr) = run_rollout(&["--loopback", "--kill", "coordinator", "--scenario", "direct"]);
    assert!(!ok && stderr.contains("no coordinator"), "{stderr}");
}

fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let prefix = format!("shb{pid}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn interrupted_namespace_run_removes_what_it_made() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        || !Path::new("/usr/sbin/tc").exists() && !Path::new("/sbin/tc").exists()
    {
        eprintln!("skipped: needs root and tc");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB through a 20 mbit origin takes ~27 s per node: still pulling when interrupted.
    let mut child = Command::new(EXE)
        .args(["rollout", "--nodes", "2", "--image", "64MiB", "--layers", "1", "--scenario", "direct"])
        .args(["--origin-rate", "20mbit", "--node-rate", "20mbit", "--out"])
        .arg(dir.path().join("r"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    // Read stderr to the end (a closed pipe would make the child's next eprintln! fail) and
    // pass the lines on.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let pulling = line.contains(": pulling");
        lines.push(line);
        if pulling {
            break;
        }
    }
    if !lines.last().is_some_and(|l| l.contains(": pulling")) {
        let _ = child.kill();
        panic!("never started pulling: {lines:#?}");
    }
    assert!(namespaces_of(pid).len() >= 5, "hub, origin, tracker and two nodes: {:?}", namespaces_of(pid));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = (0..600)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            child.try_wait().unwrap()
        })
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("rollout did not exit within 30 s of SIGINT")
        });
    assert!(!status.success(), "an interrupted run must not report success");
    assert_eq!(namespaces_of(pid), Vec::<String>::new(), "namespaces left behind");
}
