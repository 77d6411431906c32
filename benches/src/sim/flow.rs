//! The flow-level network: every transfer is a fluid flow from one host's uplink to another
//! host's downlink, and the links' capacity is shared among the flows crossing them.
//!
//! ## Sharing rule (a documented approximation of max-min fairness)
//!
//! A flow's rate is `min(up(src) / n_up(src), down(dst) / n_down(dst))`: each link is split
//! equally among its flows, and a flow runs at the smaller of its two shares. Capacity that a
//! flow cannot use because its other end limits it is *not* handed to the link's other flows,
//! as max-min fairness would. The two agree whenever the flows of a link are limited at the
//! same end (the usual case: in an origin-bound rollout every origin flow is limited by the
//! origin, in a node-bound one every node's downlink is full), and the rule undercounts a
//! link's throughput by at most the unused shares otherwise. What it buys: a flow starting or
//! ending changes the rates of the flows of two links only, never a global recomputation, so
//! 10 million piece transfers cost O(flows per link) each.
//!
//! ## Cost model
//!
//! Rates change only when a flow starts or ends on one of the flow's two links. A flow keeps
//! its progress as (bytes done at `last`, rate since `last`) and carries one pending
//! milestone event (its next piece boundary); the event is versioned. A rate change that
//! makes the milestone later pushes nothing (the old event pops early, finds bytes left, and
//! is pushed again). One that makes it earlier pushes a new event only once the rate grew by
//! more than [`SLACK`] since the pending event was computed: on a link with a thousand flows
//! every ending flow speeds up all the others by 0.1 %, and rescheduling each of them every
//! time costs O(flows²) per link. The price: a milestone may be reported up to `SLACK` of its
//! remaining transfer time late (the flow's bytes are capped at its size meanwhile), which
//! makes the simulated rollout slightly slower, never faster, than the model. Nothing here
//! scans all hosts or all flows.

/// Nanoseconds of virtual time.
pub type Time = u64;

pub const NS: f64 = 1e9;

/// Index of a host: nodes `0..n`, then the origin.
pub type Host = u32;

#[derive(Debug, Clone)]
pub struct Flow {
    pub src: Host,
    pub dst: Host,
    /// Bytes of the whole flow, and delivered so far (as of `last`).
    pub total: f64,
    pub done: f64,
    /// Bytes per nanosecond since `last`.
    pub rate: f64,
    pub last: Time,
    /// Bytes at which the next milestone falls (a piece boundary, or `total`).
    pub milestone: f64,
    /// Bumped whenever a milestone event is pushed: older events are stale.
    pub version: u32,
    /// The rate the pending milestone event was computed with.
    sched_rate: f64,
    up_pos: u32,
    down_pos: u32,
    alive: bool,
}

#[derive(Default, Clone)]
struct Link {
    cap: f64,
    flows: Vec<u32>,
}

impl Link {
    fn share(&self) -> f64 {
        self.cap / self.flows.len().max(1) as f64
    }
}

/// A milestone event to schedule: flow, version, when.
pub type Wake = (u32, u32, Time);

pub struct Network {
    up: Vec<Link>,
    down: Vec<Link>,
    flows: Vec<Flow>,
    free: Vec<u32>,
    /// Bytes each host sent and received (settled so far), for utilisation.
    pub sent: Vec<f64>,
    pub received: Vec<f64>,
    /// Milestone events: stale, early, reached.
    pub counts: [u64; 3],
}

/// Milestone precision: a flow within this many bytes of its milestone has reached it.
const EPS: f64 = 0.5;
/// Relative rate increase above which a flow's pending milestone event is rescheduled.
pub const SLACK: f64 = 0.02;

impl Network {
    /// `up[h]`, `down[h]`: capacities in bytes per second.
    pub fn new(up: &[f64], down: &[f64]) -> Network {
        let link = |c: &f64| Link { cap: c / NS, flows: Vec::new() };
        Network {
            up: up.iter().map(link).collect(),
            down: down.iter().map(link).collect(),
            flows: Vec::new(),
            free: Vec::new(),
            sent: vec![0.0; up.len()],
            received: vec![0.0; up.len()],
            counts: [0; 3],
        }
    }

    pub fn flow(&self, id: u32) -> &Flow {
        &self.flows[id as usize]
    }

    fn settle(&mut self, id: u32, now: Time) {
        let f = &mut self.flows[id as usize];
        if now > f.last {
            let moved = (f.rate * (now - f.last) as f64).min(f.total - f.done);
            f.done += moved;
            self.sent[f.src as usize] += moved;
            self.received[f.dst as usize] += moved;
        }
        f.last = now;
    }

    fn eta(f: &Flow, now: Time) -> Time {
        let left = (f.milestone - f.done).max(0.0);
        if f.rate <= 0.0 {
            return Time::MAX / 4;
        }
        now + (left / f.rate).ceil() as Time
    }

    /// Recomputes the rate of every flow on `h`'s uplink (or downlink) after its count changed.
    fn rerate(&mut self, h: Host, upside: bool, now: Time, wakes: &mut Vec<Wake>) {
        let ids = if upside {
            std::mem::take(&mut self.up[h as usize].flows)
        } else {
            std::mem::take(&mut self.down[h as usize].flows)
        };
        for &id in &ids {
            let (src, dst, old) = {
                let f = &self.flows[id as usize];
                (f.src, f.dst, f.rate)
            };
            let up_share = if upside && src == h {
                self.up[h as usize].cap / ids.len().max(1) as f64
            } else {
                self.up[src as usize].share()
            };
            let down_share = if !upside && dst == h {
                self.down[h as usize].cap / ids.len().max(1) as f64
            } else {
                self.down[dst as usize].share()
            };
            let rate = up_share.min(down_share);
            if rate != old {
                self.settle(id, now);
                let f = &mut self.flows[id as usize];
                f.rate = rate;
                if rate > old && rate > f.sched_rate * (1.0 + SLACK) {
                    f.version = f.version.wrapping_add(1);
                    f.sched_rate = rate;
                    wakes.push((id, f.version, Self::eta(f, now)));
                }
            }
        }
        if upside {
            self.up[h as usize].flows = ids;
        } else {
            self.down[h as usize].flows = ids;
        }
    }

    /// Starts a flow of `total` bytes whose first milestone is at `milestone` bytes.
    pub fn start(
        &mut self,
        src: Host,
        dst: Host,
        total: f64,
        milestone: f64,
        now: Time,
        wakes: &mut Vec<Wake>,
    ) -> u32 {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.flows.push(Flow {
                    src: 0,
                    dst: 0,
                    total: 0.0,
                    done: 0.0,
                    rate: 0.0,
                    last: 0,
                    milestone: 0.0,
                    version: 0,
                    sched_rate: 0.0,
                    up_pos: 0,
                    down_pos: 0,
                    alive: false,
                });
                (self.flows.len() - 1) as u32
            }
        };
        let up_pos = self.up[src as usize].flows.len() as u32;
        let down_pos = self.down[dst as usize].flows.len() as u32;
        self.up[src as usize].flows.push(id);
        self.down[dst as usize].flows.push(id);
        let version = self.flows[id as usize].version.wrapping_add(1);
        self.flows[id as usize] = Flow {
            src,
            dst,
            total,
            done: 0.0,
            rate: 0.0,
            last: now,
            milestone: milestone.min(total),
            version,
            sched_rate: 0.0,
            up_pos,
            down_pos,
            alive: true,
        };
        self.rerate(src, true, now, wakes);
        self.rerate(dst, false, now, wakes);
        // The new flow itself had rate 0 before: rerate pushed its first milestone.
        id
    }

    /// Removes a flow (finished or cancelled) and re-rates its two links.
    pub fn stop(&mut self, id: u32, now: Time, wakes: &mut Vec<Wake>) {
        self.settle(id, now);
        let (src, dst, up_pos, down_pos) = {
            let f = &mut self.flows[id as usize];
            f.alive = false;
            f.version = f.version.wrapping_add(1);
            (f.src, f.dst, f.up_pos as usize, f.down_pos as usize)
        };
        let up = &mut self.up[src as usize].flows;
        up.swap_remove(up_pos);
        if let Some(&moved) = up.get(up_pos) {
            self.flows[moved as usize].up_pos = up_pos as u32;
        }
        let down = &mut self.down[dst as usize].flows;
        down.swap_remove(down_pos);
        if let Some(&moved) = down.get(down_pos) {
            self.flows[moved as usize].down_pos = down_pos as u32;
        }
        self.free.push(id);
        self.rerate(src, true, now, wakes);
        self.rerate(dst, false, now, wakes);
    }

    /// A milestone event popped: `Some(bytes done)` when the flow reached its milestone (the
    /// caller then sets the next one with [`Network::next_milestone`] or stops the flow);
    /// `None` when the event was stale or early (an early one is pushed again).
    pub fn reached(&mut self, id: u32, version: u32, now: Time, wakes: &mut Vec<Wake>) -> Option<f64> {
        let f = &self.flows[id as usize];
        if !f.alive || f.version != version {
            self.counts[0] += 1;
            return None;
        }
        self.settle(id, now);
        let f = &mut self.flows[id as usize];
        if f.milestone - f.done <= EPS {
            f.done = f.done.max(f.milestone);
            self.counts[2] += 1;
            return Some(f.done);
        }
        self.counts[1] += 1;
        f.version = f.version.wrapping_add(1);
        f.sched_rate = f.rate;
        wakes.push((id, f.version, Self::eta(f, now)));
        None
    }

    pub fn next_milestone(&mut self, id: u32, milestone: f64, now: Time, wakes: &mut Vec<Wake>) {
        let f = &mut self.flows[id as usize];
        f.milestone = milestone.min(f.total);
        f.version = f.version.wrapping_add(1);
        f.sched_rate = f.rate;
        wakes.push((id, f.version, Self::eta(f, now)));
    }

    /// Every live flow touching host `h` (either direction).
    pub fn flows_of(&self, h: Host) -> Vec<u32> {
        let mut v: Vec<u32> = self.up[h as usize].flows.clone();
        v.extend(self.down[h as usize].flows.iter().copied());
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Settles every flow on `h`'s links (so `sent`/`received` are current for sampling).
    pub fn settle_host(&mut self, h: Host, now: Time) {
        for id in self.flows_of(h) {
            self.settle(id, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the network until every flow finished; returns finish times (seconds) by flow id.
    fn run(net: &mut Network, mut wakes: Vec<Wake>) -> Vec<(u64, f64)> {
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(Time, u32, u32)>> =
            wakes.drain(..).map(|(id, v, t)| std::cmp::Reverse((t, id, v))).collect();
        let mut out = Vec::new();
        while let Some(std::cmp::Reverse((t, id, v))) = heap.pop() {
            let mut w = Vec::new();
            if net.reached(id, v, t, &mut w).is_some() {
                let f = net.flow(id);
                if f.done + EPS >= f.total {
                    let _ = f;
                    out.push((u64::from(id), t as f64 / NS));
                    net.stop(id, t, &mut w);
                }
            }
            heap.extend(w.into_iter().map(|(id, v, t)| std::cmp::Reverse((t, id, v))));
        }
        out.sort_by_key(|a| a.0);
        out
    }

    #[test]
    fn one_link_is_shared_equally_and_freed_capacity_is_reused() {
        // Host 0 uploads 1 MB and 2 MB to hosts 1 and 2 at 1 MB/s: both run at 0.5 MB/s until
        // the first ends at 2 s, then the second gets the whole link and ends at 3 s.
        let mut net = Network::new(&[1e6, 1e9, 1e9], &[1e9, 1e9, 1e9]);
        let mut w = Vec::new();
        net.start(0, 1, 1e6, 1e6, 0, &mut w);
        net.start(0, 2, 2e6, 2e6, 0, &mut w);
        let done = run(&mut net, w);
        assert_eq!(done.len(), 2);
        assert!((done[0].1 - 2.0).abs() < 1e-6, "{done:?}");
        assert!((done[1].1 - 3.0).abs() < 1e-6, "{done:?}");
        assert!((net.sent[0] - 3e6).abs() < 1.0);
        assert!((net.received[2] - 2e6).abs() < 1.0);
    }

    #[test]
    fn a_flow_runs_at_its_slower_end() {
        // Uplink 10 MB/s, the receiver's downlink 1 MB/s: 1 MB takes 1 s.
        let mut net = Network::new(&[1e7, 1e7], &[1e7, 1e6]);
        let mut w = Vec::new();
        net.start(0, 1, 1e6, 1e6, 0, &mut w);
        let done = run(&mut net, w);
        assert!((done[0].1 - 1.0).abs() < 1e-6, "{done:?}");
    }

    #[test]
    fn milestones_fall_on_piece_boundaries() {
        let mut net = Network::new(&[1e6, 1e9], &[1e9, 1e9]);
        let mut w = Vec::new();
        let id = net.start(0, 1, 3e6, 1e6, 0, &mut w);
        let mut heap: Vec<Wake> = w;
        let mut times = Vec::new();
        while let Some((fid, v, t)) = heap.pop() {
            let mut w = Vec::new();
            if let Some(done) = net.reached(fid, v, t, &mut w) {
                times.push(t as f64 / NS);
                if done + EPS >= 3e6 {
                    net.stop(id, t, &mut w);
                } else {
                    net.next_milestone(id, done + 1e6, t, &mut w);
                }
            }
            heap.extend(w);
        }
        assert_eq!(times.len(), 3);
        for (k, t) in times.iter().enumerate() {
            assert!((t - (k + 1) as f64).abs() < 1e-6, "{times:?}");
        }
    }
}
