//! The timing contract between agents and trackers, in one place.
//!
//! Each side acts on the other's silence, so each constant here is read by both: an agent
//! heartbeats every [`HEARTBEAT_INTERVAL`] and asks for a plan every [`PLAN_POLL`] while it
//! downloads; a tracker that has heard nothing from a node for [`NODE_DEAD`] gives the node's
//! origin pieces to others; an agent whose last plan is older than [`PLAN_STALE`] stops
//! following plans and falls back to the DHT rules. The relations that keep the two from
//! fetching the same piece twice are checked at compile time below.

use std::time::Duration;

/// How often each tracker hears from an agent.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// How often a download reports to its planner (a tracker or the digest's coordinator) and
/// asks for a plan, unless the planner's answer paces it more slowly (`Plan::next_ask_ms`):
/// a planner with many downloaders and no origin work for a requester tells it to wait up
/// to [`PLAN_POLL_MAX`], so its load stays bounded as the cluster grows.
pub const PLAN_POLL: Duration = Duration::from_millis(500);
/// The longest a planner may tell a download to wait before its next plan request. Every
/// live download is heard from at least this often, which is what [`NODE_DEAD`] and
/// [`PLAN_STALE`] count on.
pub const PLAN_POLL_MAX: Duration = Duration::from_secs(3);
/// With no tracker answer for this long, an agent's downloads stop asking trackers for plans.
pub const TRACKER_OFFLINE_AFTER: Duration = Duration::from_secs(6);
/// A node a tracker has not heard from (no heartbeat, no plan) for this long is dead: its
/// assignments are released and it is no longer handed out as a peer. On a machine whose CPU
/// is saturated, requests arrive seconds late, and releasing a live node's pieces duplicates
/// origin traffic (measured: 1.05x the image with 6 s), so the margin is wide.
pub const NODE_DEAD: Duration = Duration::from_secs(10);
/// An assignee that has held an assignment this long without gaining a piece loses it.
pub const STALL: Duration = Duration::from_secs(20);
/// A plan older than this no longer decides an agent's origin fetches: the tracker is gone.
/// Not shorter than [`NODE_DEAD`], so an agent whose answers are merely late does not fetch
/// what the tracker has not yet given to others.
pub const PLAN_STALE: Duration = Duration::from_secs(10);

const _: () = {
    // A live node heartbeats several times before the tracker calls it dead.
    assert!(NODE_DEAD.as_millis() >= 3 * HEARTBEAT_INTERVAL.as_millis());
    // ... and plans many times while it downloads: often while it fetches from the origin,
    assert!(NODE_DEAD.as_millis() >= 10 * PLAN_POLL.as_millis());
    // and at least three times even when the planner paces it as slowly as it may.
    assert!(NODE_DEAD.as_millis() >= 3 * PLAN_POLL_MAX.as_millis());
    assert!(PLAN_POLL_MAX.as_millis() >= PLAN_POLL.as_millis());
    // An agent follows a plan until the tracker could have given its pieces away.
    assert!(PLAN_STALE.as_millis() >= NODE_DEAD.as_millis());
    // An agent calls a tracker offline before the tracker would call the agent dead.
    assert!(TRACKER_OFFLINE_AFTER.as_millis() < NODE_DEAD.as_millis());
    assert!(TRACKER_OFFLINE_AFTER.as_millis() >= 2 * HEARTBEAT_INTERVAL.as_millis());
};
