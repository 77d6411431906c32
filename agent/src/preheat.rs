//! Preheat jobs: a tracker asks this node to fetch an image before anyone pulls it. The job
//! names the manifest by digest (the tracker resolved the tag once, so every node fetches
//! the same image); the node fetches it, picks the manifest of its own platform from an
//! index, and downloads the config and every layer through the same [`Fetcher`] a pull uses
//! — from peers where they have it, from the origin where nobody does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use crate::fetch::{Fetcher, Lookup, Source};
use crate::origin::{Kind, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES};
use crate::supervise::Supervisor;
use crate::types::Digest;
use shoal_protocol::tracker::{PreheatJob, PreheatProgress, PreheatState, MAX_PREHEAT_JOBS};

/// Blob downloads one job runs at once.
const BLOB_CONCURRENCY: usize = 4;

/// The platform this node runs, as OCI names it (`linux/amd64`, `linux/arm64`, …).
pub fn local_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

/// Runs the jobs trackers hand out and keeps their progress for the heartbeats.
pub struct Preheater {
    fetcher: Arc<Fetcher>,
    /// By job id; the oldest finished ones are dropped beyond [`MAX_PREHEAT_JOBS`].
    jobs: Arc<Mutex<BTreeMap<u64, PreheatProgress>>>,
    /// Runs the jobs; a job stops (failed: shutting down) when shutdown starts.
    supervisor: Supervisor,
}

/// Longest failure text kept for a job (it travels in heartbeats, whose texts are bounded by
/// the tracker protocol).
const MAX_FAILURE_TEXT: usize = 200;
const _: () = assert!(MAX_FAILURE_TEXT <= shoal_protocol::tracker::MAX_TEXT_BYTES);

/// The state a job ends in, from the result of [`run`].
fn finished(result: Result<(), String>) -> PreheatState {
    match result {
        Ok(()) => PreheatState::Done,
        Err(why) => PreheatState::Failed(crate::sync::clip(why, MAX_FAILURE_TEXT)),
    }
}

impl Preheater {
    pub fn new(fetcher: Arc<Fetcher>, supervisor: Supervisor) -> Self {
        Preheater { fetcher, jobs: Arc::default(), supervisor }
    }

    /// Starts `job` unless it is known already.
    pub fn start(&self, job: PreheatJob) {
        {
            let mut jobs = crate::sync::lock(&self.jobs);
            if jobs.contains_key(&job.id) {
                return;
            }
            while jobs.len() >= MAX_PREHEAT_JOBS {
                let finished = jobs.iter().find(|(_, p)| p.state != PreheatState::Running).map(|(id, _)| *id);
                match finished {
                    Some(id) => jobs.remove(&id),
                    None => {
                        tracing::warn!(job = job.id, "too many preheat jobs running; refusing one");
                        return;
                    }
                };
            }
            jobs.insert(job.id, progress(job.id, PreheatState::Running));
        }
        tracing::info!(job = job.id, registry = %job.registry, repository = %job.repository, "preheat started");
        let (fetcher, jobs, cancel) = (self.fetcher.clone(), self.jobs.clone(), self.supervisor.token());
        self.supervisor.spawn("preheat", async move {
            let id = job.id;
            let result = tokio::select! {
                result = run(&fetcher, &jobs, &job) => result,
                () = cancel.cancelled() => Err("the agent is shutting down".to_string()),
            };
            let mut jobs = crate::sync::lock(&jobs);
            if let Some(p) = jobs.get_mut(&id) {
                match &result {
                    Ok(()) => {
                        tracing::info!(job = id, blobs = p.blobs_total, bytes = p.bytes_total, "preheat done")
                    }
                    Err(why) => tracing::warn!(job = id, %why, "preheat failed"),
                }
                p.state = finished(result);
            }
        });
    }

    /// Progress of every remembered job.
    pub fn progress(&self) -> Vec<PreheatProgress> {
        crate::sync::lock(&self.jobs).values().cloned().collect()
    }
}

fn progress(id: u64, state: PreheatState) -> PreheatProgress {
    PreheatProgress { id, blobs_done: 0, blobs_total: 0, bytes_done: 0, bytes_total: 0, state }
}

/// Fetches `digest` through the fetcher and waits until it is stored.
async fn fetch(fetcher: &Arc<Fetcher>, digest: &Digest, source: &Source) -> Result<(), String> {
    match fetcher.lookup(digest, source) {
        Lookup::Cached(..) => Ok(()),
        Lookup::Downloading(dl) => dl.finished().await.map_err(|e| format!("{digest}: {e}")),
    }
}

/// Fetches a manifest and returns its bytes.
async fn manifest(fetcher: &Arc<Fetcher>, digest: &Digest, source: &Source) -> Result<Vec<u8>, String> {
    fetch(fetcher, digest, source).await?;
    let (entry, guard) =
        fetcher.store().get(digest).ok_or_else(|| format!("{digest} vanished from the cache"))?;
    if entry.size > MAX_MANIFEST_BYTES {
        return Err(format!("manifest {digest} is {} bytes, more than a manifest may be", entry.size));
    }
    fetcher
        .store()
        .read_verified(guard, entry.size)
        .await
        .map_err(|e| format!("reading manifest {digest}: {e}"))
}

fn descriptor(value: &serde_json::Value) -> Option<(Digest, u64)> {
    let digest = value.get("digest")?.as_str()?.parse::<Digest>().ok()?;
    Some((digest, value.get("size")?.as_u64()?))
}

async fn run(
    fetcher: &Arc<Fetcher>,
    jobs: &Mutex<BTreeMap<u64, PreheatProgress>>,
    job: &PreheatJob,
) -> Result<(), String> {
    let registry = job.registry.parse().map_err(|e| format!("registry {:?}: {e}", job.registry))?;
    let repo = job.repository.parse().map_err(|e| format!("repository {:?}: {e}", job.repository))?;
    let manifest_source =
        Source { registry, repo, kind: Kind::Manifest, accept: MANIFEST_MEDIA_TYPES.join(", ") };
    let mut digest = Digest::from_sha256(job.manifest);
    let mut doc: serde_json::Value =
        serde_json::from_slice(&manifest(fetcher, &digest, &manifest_source).await?)
            .map_err(|e| format!("manifest {digest} is not JSON: {e}"))?;
    if let Some(list) = doc.get("manifests").and_then(|m| m.as_array()) {
        // An index: the manifest of the platform this node runs.
        let (os, arch) = local_platform();
        let chosen = list
            .iter()
            .find(|m| {
                let p = m.get("platform");
                p.and_then(|p| p.get("os")).and_then(|v| v.as_str()) == Some(os)
                    && p.and_then(|p| p.get("architecture")).and_then(|v| v.as_str()) == Some(arch)
            })
            .and_then(descriptor)
            .ok_or_else(|| format!("index {digest} has no manifest for {os}/{arch}"))?;
        digest = chosen.0;
        doc = serde_json::from_slice(&manifest(fetcher, &digest, &manifest_source).await?)
            .map_err(|e| format!("manifest {digest} is not JSON: {e}"))?;
    }
    let mut blobs: Vec<(Digest, u64)> = doc.get("config").and_then(descriptor).into_iter().collect();
    if let Some(layers) = doc.get("layers").and_then(|l| l.as_array()) {
        blobs.extend(layers.iter().filter_map(descriptor));
    }
    if blobs.is_empty() {
        return Err(format!("manifest {digest} names no config or layers"));
    }
    let update = |f: &dyn Fn(&mut PreheatProgress)| {
        if let Some(p) = crate::sync::lock(jobs).get_mut(&job.id) {
            f(p);
        }
    };
    let (count, bytes) = (blobs.len() as u32, blobs.iter().map(|b| b.1).sum::<u64>());
    update(&|p| {
        p.blobs_total = count;
        p.bytes_total = bytes;
    });
    let blob_source = Source { kind: Kind::Blob, accept: String::new(), ..manifest_source };
    let mut results = futures_util::stream::iter(blobs)
        .map(|(digest, size)| {
            let source = blob_source.clone();
            async move { fetch(fetcher, &digest, &source).await.map(|()| size) }
        })
        .buffer_unordered(BLOB_CONCURRENCY);
    while let Some(result) = results.next().await {
        let size = result?;
        update(&|p| {
            p.blobs_done += 1;
            p.bytes_done += size;
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure whose text has a multi-byte character across byte 200 used to panic in
    /// `String::truncate` inside the job's task, poisoning the job table and leaving the job
    /// `Running` forever.
    #[test]
    fn a_long_non_ascii_failure_is_clipped_not_panicking() {
        let why = format!("{}é: no such manifest", "x".repeat(199));
        assert!(!why.is_char_boundary(200));
        match finished(Err(why)) {
            PreheatState::Failed(text) => {
                assert!(text.len() <= MAX_FAILURE_TEXT);
                assert_eq!(text, "x".repeat(199));
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(finished(Ok(())), PreheatState::Done);
    }
}
