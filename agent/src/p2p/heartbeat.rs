//! The agent's side of the tracker: a heartbeat to every connected tracker every
//! [`HEARTBEAT_INTERVAL`], carrying the node's zone, counters, downloads, preheat progress and
//! the changes to the set of digests it holds.
//!
//! A tracker keeps soft state only. When it does not know the node (it restarted, or it is
//! new) it answers `resync`, and the next beats send the whole held set (in chunks of
//! [`MAX_HELD_PER_HEARTBEAT`]). While no tracker answers, [`SwarmNetwork::has_coordinator`]
//! turns false and downloads schedule by themselves, peer to peer.
//!
//! [`SwarmNetwork::has_coordinator`]: crate::fetch::net::Network::has_coordinator

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::swarm::PeerId;
use tokio::time::MissedTickBehavior;

use crate::fetch::Fetcher;
use crate::metrics::METRICS;
use crate::preheat::Preheater;
use crate::swarm::Client;
use crate::types::Digest;
use shoal_protocol::tracker::{
    Heartbeat, NodeCounters, TrackerRequest, TrackerResponse, MAX_DOWNLOADING, MAX_HELD_PER_HEARTBEAT,
    MAX_PREHEAT_JOBS,
};

pub use shoal_protocol::timing::HEARTBEAT_INTERVAL;
use shoal_protocol::timing::TRACKER_OFFLINE_AFTER as OFFLINE_AFTER;

/// What one tracker has been told.
#[derive(Default)]
struct View {
    /// It has the first (full) chunk of our held set.
    synced: bool,
    announced: HashSet<Digest>,
}

/// Sends heartbeats until `cancel`; sets `online` while a tracker answers.
pub async fn run(
    client: Client,
    fetcher: Arc<Fetcher>,
    preheater: Arc<Preheater>,
    zone: Option<String>,
    online: Arc<AtomicBool>,
    cancel: crate::supervise::CancellationToken,
) {
    tokio::select! {
        () = beat(client, fetcher, preheater, zone, online) => {}
        () = cancel.cancelled() => {}
    }
}

async fn beat(
    client: Client,
    fetcher: Arc<Fetcher>,
    preheater: Arc<Preheater>,
    zone: Option<String>,
    online: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut views: HashMap<PeerId, View> = HashMap::new();
    let mut last_answer: Option<Instant> = None;
    loop {
        tick.tick().await;
        let trackers = client.trackers().await;
        if trackers.is_empty() {
            // A tracker that restarted is back within a beat, not at the next 30 s
            // bootstrap round.
            let _ = client.redial_bootstrap().await;
        }
        views.retain(|t, _| trackers.contains(t));
        let held: HashSet<Digest> = fetcher.store().digests().into_iter().collect();
        let mut downloading: Vec<[u8; 32]> =
            fetcher.in_flight_digests().iter().map(|d| *d.as_bytes()).collect();
        downloading.truncate(MAX_DOWNLOADING);
        let mut preheat = preheater.progress();
        preheat.truncate(MAX_PREHEAT_JOBS);
        let counters = NodeCounters {
            origin_bytes: METRICS.origin_bytes.get(),
            peer_bytes: METRICS.received_from("peer"),
            sent_bytes: METRICS.peer_sent_bytes.get(),
            cache_bytes: METRICS.cache_bytes.get().max(0) as u64,
        };
        for tracker in trackers {
            let view = views.entry(tracker).or_default();
            let full = !view.synced;
            if full {
                view.announced.clear();
            }
            let held_added: Vec<Digest> =
                held.difference(&view.announced).take(MAX_HELD_PER_HEARTBEAT).copied().collect();
            let held_removed: Vec<Digest> =
                view.announced.difference(&held).take(MAX_HELD_PER_HEARTBEAT).copied().collect();
            let beat = Heartbeat {
                zone: zone.clone(),
                full,
                held_added: held_added.iter().map(|d| *d.as_bytes()).collect(),
                held_removed: held_removed.iter().map(|d| *d.as_bytes()).collect(),
                downloading: downloading.clone(),
                counters: counters.clone(),
                preheat: preheat.clone(),
            };
            match client.tracker_request(tracker, TrackerRequest::Heartbeat(beat)).await {
                Ok(TrackerResponse::Heartbeat { resync, preheat: jobs }) => {
                    last_answer = Some(Instant::now());
                    if resync {
                        tracing::info!(%tracker, "tracker asked for our held digests again");
                        *view = View::default();
                    } else {
                        view.synced = true;
                        view.announced.extend(held_added);
                        for d in &held_removed {
                            view.announced.remove(d);
                        }
                    }
                    for job in jobs {
                        preheater.start(job);
                    }
                }
                Ok(TrackerResponse::Refused(why)) => {
                    tracing::warn!(%tracker, %why, "tracker refused a heartbeat")
                }
                Ok(other) => tracing::debug!(%tracker, ?other, "unexpected answer to a heartbeat"),
                Err(e) => tracing::debug!(%tracker, error = %e, "heartbeat failed"),
            }
        }
        let was = online.load(Ordering::Relaxed);
        let now_online = last_answer.is_some_and(|t| t.elapsed() < OFFLINE_AFTER);
        if was != now_online {
            if now_online {
                tracing::info!("tracker online: downloads follow its plans");
            } else {
                tracing::warn!("no tracker answers: downloads schedule peer to peer");
            }
            online.store(now_online, Ordering::Relaxed);
        }
    }
}
