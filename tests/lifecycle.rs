//! The agent's process lifecycle and bounds, end to end: SIGTERM during a download exits 0
//! within the grace period and a restart resumes the verified pieces; a flood of requests
//! for distinct digests leaves the agent's task count and memory bounded.

use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use shoal_tests::pull::url;
use shoal_tests::{
    digest_of, http_client, poll_until, AccessLogExt, Agent, AgentOptions, FaultyProxy, ImageKind, ImageSpec,
    Origin, ProxyConfig,
};

/// Resident memory of a process, in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// SIGTERM while a download runs: the agent stops within its grace period with exit 0, and
/// the restarted agent resumes the pieces it had verified instead of fetching them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_download_exits_0_in_time_and_the_restart_resumes() {
    let origin = Origin::start().await.unwrap();
    let size: u64 = 32 << 20;
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "life/term", "v1").layers(&[size]))
        .await
        .unwrap();
    // 4 MiB/s: what is left after a third (21 MiB) takes longer than the grace period.
    let slow = ProxyConfig { total_bytes_per_sec: Some(4 << 20), ..Default::default() };
    let proxy = FaultyProxy::in_front_of(&origin, slow).await.unwrap();
    let grace = Duration::from_secs(3);
    let mut agent = Agent::start(
        AgentOptions::new().upstream(&origin.host(), &proxy.url()).arg("--shutdown-grace").arg("3s"),
    )
    .await
    .unwrap();
    let layer = image.largest_layer().clone();
    let blob_url = url(&agent, &origin, &image.repo, "blobs", &layer.digest);
    let client = http_client();
    let request = tokio::spawn({
        let (client, blob_url) = (client.clone(), blob_url.clone());
        async move { client.get(&blob_url).send().await?.bytes().await.map(|b| b.len()) }
    });
    poll_until(
        "a third of the pieces verified",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async { Ok((agent.metric("shoal_pieces_verified_total", &[]).await >= 11.0).then_some(())) },
    )
    .await
    .unwrap();

    // Every piece verified before the signal must be resumed after it: the download saves
    // its map when it is stopped, not only every few pieces.
    let verified_before = agent.metric("shoal_pieces_verified_total", &[]).await;
    let sent = Instant::now();
    let status = agent.terminate_within(grace + Duration::from_secs(5));
    let took = sent.elapsed();
    let log = agent.log_tail();
    let status = status.unwrap_or_else(|| panic!("the agent did not exit on SIGTERM; log:\n{log}"));
    assert!(status.success(), "exit status {status} after SIGTERM; log:\n{log}");
    // The download stops at the signal (saving its map), not when the grace period cuts it.
    assert!(
        took < grace,
        "SIGTERM to exit took {took:?}: the download ran on into the {grace:?} grace period"
    );
    assert!(log.contains("shutting down"), "no shutdown in the log:\n{log}");
    // The client's download was cut (never a complete, wrong body).
    if let Ok(Ok(n)) = request.await {
        assert!(n < size as usize, "the client got {n} bytes of a {size}-byte blob that never finished");
    }

    agent.restart().await.unwrap();
    let resp = client.get(&blob_url).timeout(Duration::from_secs(60)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert_eq!(digest_of(&body), layer.digest);
    let resumed = agent.metric("shoal_pieces_resumed_total", &[]).await;
    assert!(
        resumed >= verified_before,
        "resumed {resumed} pieces, but {verified_before} were verified before SIGTERM"
    );
    let origin_sent = origin.access_log().blob_get_bytes_for(&layer.digest);
    assert!(origin_sent < size + size / 2, "the origin sent {origin_sent} bytes for {size}: no resume");
    eprintln!(
        "SIGTERM to exit: {took:?}; {verified_before} pieces verified before it, {resumed} resumed; origin sent {origin_sent} of {size} bytes"
    );
}

/// 4,000 requests for distinct digests nobody has, 512 at a time, against an agent that
/// serves at most 64 at once: the rest are told 429 at once, the agent's tasks stay within a
/// bound set by the open connections (not by the number of requests), its memory grows by
/// little, and everything it started is gone a moment later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_digests_stays_bounded() {
    const REQUESTS: usize = 4000;
    const CONCURRENCY: usize = 512;
    const MAX_REQUESTS: usize = 64;
    let origin = Origin::start().await.unwrap();
    let agent = Agent::start(
        AgentOptions::new()
            .upstream(&origin.host(), &origin.url())
            .arg("--max-requests")
            .arg(&MAX_REQUESTS.to_string()),
    )
    .await
    .unwrap();
    let pid = agent.pid().expect("agent pid");
    let client = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().unwrap();
    let base_tasks = agent.metric("shoal_tasks", &[]).await;
    let base_rss = rss_kib(pid);

    // Two floods: what each leaves behind must not add up.
    let mut residual = Vec::new();
    for round in 1..=2 {
        let done = std::sync::atomic::AtomicBool::new(false);
        let sampler = async {
            let (mut max_tasks, mut max_rss) = (0f64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                max_tasks = max_tasks.max(agent.metric("shoal_tasks", &[]).await);
                max_rss = max_rss.max(rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (max_tasks, max_rss)
        };
        let flood = async {
            let statuses: Vec<u16> = stream::iter(0..REQUESTS)
                .map(|i| {
                    let digest = digest_of(format!("flood {i} {}", rand::random::<u64>()).as_bytes());
                    let u = url(&agent, &origin, "flood/app", "blobs", &digest);
                    let client = client.clone();
                    async move {
                        match client.get(&u).timeout(Duration::from_secs(60)).send().await {
                            Ok(resp) => resp.status().as_u16(),
                            Err(_) => 0,
                        }
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            statuses
        };
        let started = Instant::now();
        let (statuses, (max_tasks, max_rss)) = tokio::join!(flood, sampler);
        let elapsed = started.elapsed();
        let count = |code: u16| statuses.iter().filter(|&&s| s == code).count();
        let (not_found, too_many) = (count(404), count(429));
        eprintln!(
            "round {round}: {REQUESTS} requests, {CONCURRENCY} at a time, --max-requests {MAX_REQUESTS}, in {elapsed:?}: \
             {not_found} x 404, {too_many} x 429, other {}; tasks {base_tasks} -> max {max_tasks}; \
             RSS {base_rss} KiB -> max {max_rss} KiB (+{} KiB)",
            REQUESTS - not_found - too_many,
            max_rss.saturating_sub(base_rss)
        );
        assert_eq!(not_found + too_many, REQUESTS, "every answer is 404 or 429: {statuses:?}");
        assert!(too_many > 0, "the request bound never answered 429 with {CONCURRENCY} clients at once");
        assert!(not_found >= MAX_REQUESTS, "only {not_found} requests were served");
        // Each open connection is a task, each admitted request a download with a few: the bound
        // is the clients' concurrency plus a few per admitted request, whatever REQUESTS is.
        let bound = base_tasks + (CONCURRENCY + 8 * MAX_REQUESTS) as f64;
        assert!(max_tasks <= bound, "{max_tasks} tasks alive at once (bound {bound})");
        assert!(max_rss.saturating_sub(base_rss) < 128 << 10, "RSS grew from {base_rss} to {max_rss} KiB");
        // Let the downloads of unknown digests end with their 404s, then count what stays.
        tokio::time::sleep(Duration::from_secs(3)).await;
        residual.push(agent.metric("shoal_tasks", &[]).await);
    }
    eprintln!("tasks alive 3 s after each flood: {residual:?} (before: {base_tasks})");
    assert!(residual[1] <= residual[0] + 16.0, "tasks left behind add up: {residual:?}");
    drop(client);
}
