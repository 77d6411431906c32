//! Shoal benchmarks, run with real parts: `docker-registry` as the origin, agents as
//! processes on loopback, blobs fetched over HTTP like a client would.
//!
//! `peer-path`: one fresh agent downloads a blob from the origin (through its own agent),
//! then from 1, 4 and 8 peers that already hold it (the origin is not asked), in the same
//! run, alternating, and prints throughputs, medians and the peer/origin ratio.
//!
//! ```text
//! cargo build --release --bins && \
//! SHOAL_AGENT_BIN=target/release/shoal-agent cargo run --release -p shoal-benches -- peer-path --size 1GiB
//! ```
//!
//! `cached-read`: what verify-on-read costs. A 1 GiB blob cached by an agent is read through
//! the agent and straight from `docker-registry`, alternating, in the same run: one reader,
//! four readers at once, and `ctr content fetch` of the whole image (a fresh containerd each
//! time); prints medians and the agent/direct throughput ratio.
//!
//! ```text
//! cargo build --release -p shoal-agent && cargo build -p shoal-benches && \
//! SHOAL_AGENT_BIN=target/release/shoal-agent target/debug/shoal-benches cached-read --size 1GiB
//! ```
//!
//! `rollout`: N nodes pull one image at the same moment, each in its own shaped network
//! namespace (or on loopback), for the `direct`, `dht` and `tracker` scenarios; origin egress
//! and completion times against the physical limit (module [`rollout`], `benches/README.md`).
//!
//! `sim`: the same rollout simulated at up to 100,000 nodes in virtual time (module [`sim`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures_util::future::join_all;
use shoal_tests::{http_client, AccessLogExt, Agent, AgentOptions, Image, ImageKind, ImageSpec, Origin};

mod rollout;
mod sim;

#[derive(Parser)]
#[command(name = "shoal-benches")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Blob download throughput from peers against from the origin.
    PeerPath {
        /// Blob size, e.g. 1GiB.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Numbers of source peers to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
        peers: Vec<usize>,
        /// Measured rounds (each: origin, then every peer count).
        #[arg(long, default_value = "3")]
        rounds: usize,
        /// Smallest piece size for every agent (bytes), to compare piece-size policies.
        #[arg(long)]
        min_piece_size: Option<u64>,
        /// Seconds every measured agent waits, once ready, before its download: both paths
        /// then start from the same memory state (see `settle` in the source).
        #[arg(long, default_value = "3")]
        settle_secs: u64,
        /// Transports of the fresh agent's peer connections, each measured every round:
        /// `default` (the agent's defaults), `noise` or `tls` (TCP + yamux with only that
        /// security protocol offered), `quic` (QUIC, dialing the seeds' UDP addresses). The
        /// seeds listen on TCP and QUIC and accept both TCP security protocols.
        #[arg(long, value_delimiter = ',', default_value = "default")]
        transports: Vec<String>,
    },
    /// Cached blob throughput through the agent (every piece verified on read) against the
    /// origin `docker-registry` directly: 1 and 4 readers, and `ctr content fetch`.
    CachedRead {
        /// Blob size, e.g. 1GiB.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Measured rounds (each: every case, direct and through the agent).
        #[arg(long, default_value = "3")]
        rounds: usize,
    },
    /// N nodes pull one image at once: origin egress and completion times per scenario
    /// (`direct`, `dht`, `tracker`), in shaped network namespaces or on loopback.
    Rollout(rollout::Args),
    /// The rollout simulated: N nodes (up to 100,000) in virtual time, a flow-level network,
    /// libp2p's DHT limits and the tracker's real state (module [`sim`], `benches/README.md`).
    Sim(sim::Args),
    /// GET a URL until it answers 200 and print the body (run by `rollout` inside namespaces).
    #[command(hide = true)]
    Probe {
        url: String,
        #[arg(long, default_value_t = 20_000)]
        timeout_ms: u64,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    num.trim().parse::<u64>().map(|n| n * mult).map_err(|e| format!("{s:?}: {e}"))
}

/// GETs the blob through `agent` and returns the seconds it took (body read and counted).
async fn fetch(agent: &Agent, origin: &Origin, image: &Image) -> Result<f64> {
    let blob = image.largest_layer();
    let url = format!("{}/v2/{}/blobs/{}?ns={}", agent.url(), image.repo, blob.digest, origin.host());
    let started = Instant::now();
    let mut resp = http_client().get(&url).timeout(Duration::from_secs(600)).send().await?;
    if resp.status() != 200 {
        bail!("GET {url}: {}", resp.status());
    }
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        n += chunk.len() as u64;
    }
    if n != blob.size {
        bail!("GET {url}: {n} of {} bytes", blob.size);
    }
    Ok(started.elapsed().as_secs_f64())
}

fn agent_options(origin: &Origin, min_piece: Option<u64>) -> AgentOptions {
    let mut o = AgentOptions::new().upstream(&origin.host(), &origin.url());
    if let Some(p) = min_piece {
        o = o.env("SHOAL_BENCH_MIN_PIECE_SIZE", &p.to_string());
    }
    o
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Waits before a measured download so that both paths start from the same memory state.
///
/// On a VM whose balloon driver reports free pages to the host (this project's CI machines
/// do), pages freed by the previous round's agent go back to the host about a second later,
/// and writing the page cache into fresh pages costs several times more: `dd` of 1 GiB takes
/// 0.2 s right after deleting a 1 GiB file, 0.75-0.9 s after waiting 1-3 s. The origin path
/// used to start its download at once and reuse the previous round's pages, while the peer
/// path first waits for its connections and got fresh ones: the ratio then measured the
/// host's memory, not Shoal. A node pulling an image writes into fresh pages, so both paths
/// wait for that state.
async fn settle(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(stat) = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) close with ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name; 100 ticks a second.
    (ticks(11) + ticks(12)) / 100.0
}

async fn peer_path(
    size: u64,
    peer_counts: Vec<usize>,
    rounds: usize,
    min_piece: Option<u64>,
    settle_secs: u64,
    transports: Vec<String>,
) -> Result<()> {
    for t in &transports {
        if !["default", "noise", "tls", "quic"].contains(&t.as_str()) {
            bail!("unknown transport {t:?} (default, noise, tls, quic)");
        }
    }
    // One column per (transport, peer count).
    let cases: Vec<(String, usize)> =
        transports.iter().flat_map(|t| peer_counts.iter().map(move |&n| (t.clone(), n))).collect();
    let origin = Origin::start().await?;
    let image =
        origin.push(&ImageSpec::new(ImageKind::OciManifest, "bench/blob", "v1").layers(&[size])).await?;
    let max_peers = peer_counts.iter().copied().max().unwrap_or(1);
    // Seeds: each pulls the blob from the origin on its own, bootstrapped to no one, and all
    // restart before each case (forgetting the peers the last case showed them), so a
    // case's fresh agent can only learn of the seeds it is bootstrapped to. Seeds that knew
    // one another served a "1 peer" download together, found through the DHT (2026-12-08:
    // 0.6-0.7 GiB of 1 GiB from seeds outside the case); each case prints those bytes.
    let mut seeds = Vec::new();
    for _ in 0..max_peers {
        let a = Agent::start(agent_options(&origin, min_piece).quic()).await?;
        fetch(&a, &origin, &image).await.context("seeding a peer")?;
        seeds.push(a);
    }
    let mib = size as f64 / 1048576.0;
    println!(
        "blob {mib:.0} MiB, {rounds} rounds, {settle_secs} s settle before each download, agent {}",
        shoal_tests::agent_binary()?.display()
    );
    let mut origin_times = Vec::new();
    let mut peer_times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        // Origin path: a fresh agent with no peers.
        let solo = Agent::start(agent_options(&origin, min_piece).arg("--no-p2p")).await?;
        settle(settle_secs).await;
        let cpu = cpu_secs(solo.pid());
        let t = fetch(&solo, &origin, &image).await?;
        let gib = size as f64 / 1073741824.0;
        println!(
            "round {round}: origin            {:8.1} MiB/s (agent {:.2} CPU-s/GiB)",
            mib / t,
            (cpu_secs(solo.pid()) - cpu) / gib
        );
        origin_times.push(t);
        drop(solo);
        for (k, (transport, count)) in cases.iter().enumerate() {
            let count = *count;
            let mut opts = agent_options(&origin, min_piece);
            match transport.as_str() {
                "noise" | "tls" => opts = opts.arg("--p2p-security").arg(transport),
                _ => {}
            }
            join_all(seeds.iter_mut().map(|s| s.restart())).await.into_iter().collect::<Result<Vec<_>>>()?;
            for s in &seeds[..count] {
                let addr = if transport == "quic" { s.quic_addr().await? } else { s.p2p_addr().await? };
                opts = opts.arg("--bootstrap").arg(&addr);
            }
            let fresh = Agent::start(opts).await?;
            // Wait until it is connected to every source peer.
            let wait = Instant::now();
            while fresh.metric_value("shoal_connected_peers", &[]).await?.unwrap_or(0.0) < count as f64 {
                if wait.elapsed() > Duration::from_secs(20) {
                    bail!("fresh agent did not connect to {count} peers");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            settle(settle_secs).await;
            let mark = origin.access_log().len();
            // Every seed's CPU counts, not only the case's: any seed that works during the
            // download works for it.
            let seeds_cpu = |seeds: &[Agent]| seeds.iter().map(|s| cpu_secs(s.pid())).sum::<f64>();
            let others_sent = || async {
                let mut sent = 0.0;
                for s in &seeds[count..] {
                    sent += s.metric_value("shoal_peer_sent_bytes_total", &[]).await?.unwrap_or(0.0);
                }
                anyhow::Ok(sent)
            };
            let others_before = others_sent().await?;
            let (cpu, cpu_seeds) = (cpu_secs(fresh.pid()), seeds_cpu(&seeds));
            let t = fetch(&fresh, &origin, &image).await?;
            let gib = size as f64 / 1073741824.0;
            let (cpu, cpu_seeds) =
                ((cpu_secs(fresh.pid()) - cpu) / gib, (seeds_cpu(&seeds) - cpu_seeds) / gib);
            let origin_bytes = origin.access_log_since(mark).blob_get_bytes();
            let others = others_sent().await? - others_before;
            println!(
                "round {round}: {transport:7} {count} peer(s) {:8.1} MiB/s (agent {cpu:.2}, seeds {cpu_seeds:.2} CPU-s/GiB; origin bytes during it: {origin_bytes}, other seeds' bytes: {others})",
                mib / t
            );
            peer_times[k].push(t);
        }
    }
    let origin_median = median(&mut origin_times);
    println!("\nmedian throughput (MiB/s), blob {mib:.0} MiB:");
    println!("  origin      {:8.1}", mib / origin_median);
    for (k, (transport, count)) in cases.iter().enumerate() {
        let m = median(&mut peer_times[k]);
        println!(
            "  {transport:7} {count} peer(s)   {:8.1}   ratio to origin {:.2}",
            mib / m,
            origin_median / m
        );
    }
    drop(join_all(seeds.into_iter().map(|a| async move { drop(a) })).await);
    Ok(())
}

/// GETs `url` with `readers` clients at once; seconds until the last body was read whole.
async fn read_parallel(url: &str, size: u64, readers: usize) -> Result<f64> {
    let started = Instant::now();
    let results = join_all((0..readers).map(|_| async {
        let mut resp = http_client().get(url).timeout(Duration::from_secs(600)).send().await?;
        if resp.status() != 200 {
            bail!("GET {url}: {}", resp.status());
        }
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            n += chunk.len() as u64;
        }
        if n != size {
            bail!("GET {url}: {n} of {size} bytes");
        }
        Ok(())
    }))
    .await;
    for r in results {
        r?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `ctr content fetch` of `image` through `hosts_dir` into a fresh containerd: seconds.
async fn ctr_fetch(image: &Image, hosts_dir: &std::path::Path) -> Result<f64> {
    let ctd = shoal_tests::Containerd::start().await?;
    let started = Instant::now();
    ctd.fetch(&image.reference(), hosts_dir, &[]).await?;
    let t = started.elapsed().as_secs_f64();
    drop(ctd);
    Ok(t)
}

async fn cached_read(size: u64, rounds: usize) -> Result<()> {
    let origin = Origin::start().await?;
    let image =
        origin.push(&ImageSpec::new(ImageKind::OciManifest, "bench/cached", "v1").layers(&[size])).await?;
    let agent = Agent::start(agent_options(&origin, None).arg("--no-p2p")).await?;
    fetch(&agent, &origin, &image).await.context("caching the blob in the agent")?;
    let blob = image.largest_layer();
    let direct_url = format!("{}/v2/{}/blobs/{}", origin.url(), image.repo, blob.digest);
    let agent_url = format!("{}/v2/{}/blobs/{}?ns={}", agent.url(), image.repo, blob.digest, origin.host());
    let hosts = tempfile::tempdir()?;
    let direct_hosts = hosts.path().join("direct");
    let agent_hosts = hosts.path().join("agent");
    shoal_tests::write_hosts_toml(&direct_hosts, &origin.host(), None, &origin.url())?;
    shoal_tests::write_hosts_toml(
        &agent_hosts,
        &origin.host(),
        Some(&agent.url()),
        &shoal_tests::dead_url(),
    )?;
    // Warm both sides' page cache once, so neither measures the disk.
    read_parallel(&direct_url, blob.size, 1).await?;
    read_parallel(&agent_url, blob.size, 1).await?;
    let mib = blob.size as f64 / 1048576.0;
    let image_mib = image.total_blob_bytes() as f64 / 1048576.0;
    println!(
        "cached blob {mib:.0} MiB, {rounds} rounds, agent {} (every piece verified on read)",
        shoal_tests::agent_binary()?.display()
    );
    let cases = ["1 reader", "4 readers", "ctr content fetch"];
    let mut times: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; cases.len()];
    for round in 0..rounds {
        for (k, case) in cases.iter().enumerate() {
            for (side, label) in [(0, "direct"), (1, "agent")] {
                let (url, hosts_dir) =
                    if side == 0 { (&direct_url, &direct_hosts) } else { (&agent_url, &agent_hosts) };
                let (t, bytes) = match k {
                    0 => (read_parallel(url, blob.size, 1).await?, mib),
                    1 => (read_parallel(url, blob.size, 4).await?, 4.0 * mib),
                    _ => (ctr_fetch(&image, hosts_dir).await?, image_mib),
                };
                println!("round {round}: {case:18} {label:6} {:8.1} MiB/s", bytes / t);
                times[k][side].push(t);
            }
        }
    }
    let served = agent.metric("shoal_served_bytes_total", &[("source", "cache")]).await;
    println!("\nmedian throughput (MiB/s), agent / direct:");
    for (k, case) in cases.iter().enumerate() {
        let bytes = match k {
            0 => mib,
            1 => 4.0 * mib,
            _ => image_mib,
        };
        let direct = median(&mut times[k][0]);
        let through = median(&mut times[k][1]);
        println!(
            "  {case:18} direct {:8.1}  agent {:8.1}  ratio {:.3}",
            bytes / direct,
            bytes / through,
            direct / through
        );
    }
    println!("(agent served {:.0} MiB from its cache)", served / 1048576.0);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::PeerPath { size, peers, rounds, min_piece_size, settle_secs, transports } => {
            if std::env::var_os("SHOAL_AGENT_BIN").is_none() {
                let release = shoal_tests::util::workspace_dir().join("target/release/shoal-agent");
                if release.is_file() {
                    std::env::set_var("SHOAL_AGENT_BIN", release);
                }
            }
            peer_path(size, peers, rounds.max(1), min_piece_size, settle_secs, transports).await
        }
        Command::CachedRead { size, rounds } => cached_read(size, rounds.max(1)).await,
        Command::Rollout(args) => rollout::main(args).await,
        Command::Sim(args) => sim::run(args),
        Command::Probe { url, timeout_ms } => rollout::probe(&url, Duration::from_millis(timeout_ms)).await,
    }
}
