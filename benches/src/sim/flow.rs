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
//! its progress as (bytes done at `last`, rate since `last`) and its next milestone (a piece
//! boundary, or its end). The network owns the milestones in an indexed binary heap (each
//! flow knows its position): a rate change moves the flow's one entry up or down in place, a
//! stopped flow's entry is removed. So the queue holds exactly one entry per live flow, no
//! stale or early milestones are ever popped, and every milestone is reported at the exact
//! time the model gives (an earlier version pushed a new event per rate increase of more than
//! 2 % and let the old ones pop as stale: 22 stale events per piece at 100 nodes). Ties are
//! broken by the order in which milestones were (re)computed, so the order is deterministic.
//! Nothing here scans all hosts or all flows.

/// Nanoseconds of virtual time.
pub type Time = u64;

pub const NS: f64 = 1e9;

/// Index of a host: nodes `0..n`, then the origin.
pub type Host = u32;

/// Not in the milestone heap.
const NOWHERE: u32 = u32::MAX;

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
    /// When the milestone falls at the current rate, and the tie-break of that entry.
    at: Time,
    order: u64,
    heap_pos: u32,
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

pub struct Network {
    up: Vec<Link>,
    down: Vec<Link>,
    flows: Vec<Flow>,
    free: Vec<u32>,
    /// Live flows by (milestone time, order): an indexed binary heap.
    heap: Vec<u32>,
    order: u64,
    /// Bytes each host sent and received (settled so far), for utilisation.
    pub sent: Vec<f64>,
    pub received: Vec<f64>,
    /// Milestones popped: before their bytes were through (numerical slack), and reached.
    pub counts: [u64; 2],
}

/// Milestone precision: a flow within this many bytes of its milestone has reached it.
const EPS: f64 = 0.5;

impl Network {
    /// `up[h]`, `down[h]`: capacities in bytes per second.
    pub fn new(up: &[f64], down: &[f64]) -> Network {
        let link = |c: &f64| Link { cap: c / NS, flows: Vec::new() };
        Network {
            up: up.iter().map(link).collect(),
            down: down.iter().map(link).collect(),
            flows: Vec::new(),
            free: Vec::new(),
            heap: Vec::new(),
            order: 0,
            sent: vec![0.0; up.len()],
            received: vec![0.0; up.len()],
            counts: [0; 2],
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
        // Rounded up (`as` truncates; `ceil` is a libm call on the hottest path).
        now + (left / f.rate) as Time + 1
    }

    // ----- the indexed heap -----

    fn key(&self, id: u32) -> (Time, u64) {
        let f = &self.flows[id as usize];
        (f.at, f.order)
    }

    fn place(&mut self, pos: usize, id: u32) {
        self.heap[pos] = id;
        self.flows[id as usize].heap_pos = pos as u32;
    }

    fn sift_up(&mut self, mut pos: usize) {
        let id = self.heap[pos];
        let key = self.key(id);
        while pos > 0 {
            let parent = (pos - 1) / 2;
            let pid = self.heap[parent];
            if self.key(pid) <= key {
                break;
            }
            self.place(pos, pid);
            pos = parent;
        }
        self.place(pos, id);
    }

    fn sift_down(&mut self, mut pos: usize) {
        let id = self.heap[pos];
        let key = self.key(id);
        let n = self.heap.len();
        loop {
            let left = 2 * pos + 1;
            if left >= n {
                break;
            }
            let right = left + 1;
            let child = if right < n && self.key(self.heap[right]) < self.key(self.heap[left]) {
                right
            } else {
                left
            };
            let cid = self.heap[child];
            if key <= self.key(cid) {
                break;
            }
            self.place(pos, cid);
            pos = child;
        }
        self.place(pos, id);
    }

    /// Recomputes when flow `id`'s milestone falls and moves its heap entry there.
    fn rekey(&mut self, id: u32, now: Time) {
        self.order += 1;
        let order = self.order;
        let f = &mut self.flows[id as usize];
        let old = f.at;
        f.at = Self::eta(f, now);
        f.order = order;
        let (at, pos) = (f.at, f.heap_pos);
        if pos == NOWHERE {
            self.heap.push(id);
            let last = self.heap.len() - 1;
            self.sift_up(last);
        } else if at < old {
            self.sift_up(pos as usize);
        } else {
            self.sift_down(pos as usize);
        }
    }

    fn unheap(&mut self, id: u32) {
        let pos = self.flows[id as usize].heap_pos;
        if pos == NOWHERE {
            return;
        }
        self.flows[id as usize].heap_pos = NOWHERE;
        let last = self.heap.pop().expect("a flow in the heap");
        if last != id {
            let pos = pos as usize;
            self.place(pos, last);
            self.sift_down(pos);
            let p = self.flows[last as usize].heap_pos as usize;
            self.sift_up(p);
        }
    }

    /// When the earliest milestone falls, if any flow is live.
    pub fn next_at(&self) -> Option<Time> {
        self.heap.first().map(|&id| self.flows[id as usize].at)
    }

    /// Recomputes the rate of every flow on `h`'s uplink (or downlink) after its count changed.
    fn rerate(&mut self, h: Host, upside: bool, now: Time) {
        let ids = if upside {
            std::mem::take(&mut self.up[h as usize].flows)
        } else {
            std::mem::take(&mut self.down[h as usize].flows)
        };
        let own = if upside { self.up[h as usize].cap } else { self.down[h as usize].cap }
            / ids.len().max(1) as f64;
        for &id in &ids {
            let (src, dst, old) = {
                let f = &self.flows[id as usize];
                (f.src, f.dst, f.rate)
            };
            let rate = if upside {
                own.min(self.down[dst as usize].share())
            } else {
                self.up[src as usize].share().min(own)
            };
            if rate != old {
                self.settle(id, now);
                self.flows[id as usize].rate = rate;
                self.rekey(id, now);
            }
        }
        if upside {
            self.up[h as usize].flows = ids;
        } else {
            self.down[h as usize].flows = ids;
        }
    }

    /// Starts a flow of `total` bytes whose first milestone is at `milestone` bytes.
    pub fn start(&mut self, src: Host, dst: Host, total: f64, milestone: f64, now: Time) -> u32 {
        let fresh = Flow {
            src,
            dst,
            total,
            done: 0.0,
            rate: 0.0,
            last: now,
            milestone: milestone.min(total),
            at: Time::MAX,
            order: 0,
            heap_pos: NOWHERE,
            up_pos: self.up[src as usize].flows.len() as u32,
            down_pos: self.down[dst as usize].flows.len() as u32,
            alive: true,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id as usize] = fresh;
                id
            }
            None => {
                self.flows.push(fresh);
                (self.flows.len() - 1) as u32
            }
        };
        self.up[src as usize].flows.push(id);
        self.down[dst as usize].flows.push(id);
        self.rerate(src, true, now);
        self.rerate(dst, false, now);
        if self.flows[id as usize].heap_pos == NOWHERE {
            // Rate 0 (a link of no capacity): listed all the same, it never falls due.
            self.rekey(id, now);
        }
        id
    }

    /// Removes a flow (finished or cancelled) and re-rates its two links.
    pub fn stop(&mut self, id: u32, now: Time) {
        self.settle(id, now);
        self.unheap(id);
        let (src, dst, up_pos, down_pos) = {
            let f = &mut self.flows[id as usize];
            f.alive = false;
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
        self.rerate(src, true, now);
        self.rerate(dst, false, now);
    }

    /// Takes the earliest milestone, due at `now` (from [`Network::next_at`]): `Some((flow,
    /// bytes done))` when the flow reached it (the caller then sets the next one with
    /// [`Network::next_milestone`] or stops the flow; until then it is out of the heap);
    /// `None` when rounding left bytes to go (its entry is moved to the new time).
    pub fn pop(&mut self, now: Time) -> Option<(u32, f64)> {
        let &id = self.heap.first()?;
        self.settle(id, now);
        let f = &mut self.flows[id as usize];
        if f.milestone - f.done <= EPS {
            f.done = f.done.max(f.milestone);
            let done = f.done;
            self.counts[1] += 1;
            self.unheap(id);
            return Some((id, done));
        }
        self.counts[0] += 1;
        self.rekey(id, now);
        None
    }

    pub fn next_milestone(&mut self, id: u32, milestone: f64, now: Time) {
        let f = &mut self.flows[id as usize];
        f.milestone = milestone.min(f.total);
        self.rekey(id, now);
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

    /// Runs the network until every flow finished, each flow in one milestone (`piece`
    /// bytes per milestone); returns (flow id, milestone times in seconds).
    fn run(net: &mut Network, piece: f64) -> Vec<(u32, Vec<f64>)> {
        let mut out: std::collections::BTreeMap<u32, Vec<f64>> = Default::default();
        let mut steps = 0;
        while let Some(t) = net.next_at() {
            steps += 1;
            assert!(steps < 10_000, "no progress");
            if let Some((id, done)) = net.pop(t) {
                out.entry(id).or_default().push(t as f64 / NS);
                if done + EPS >= net.flow(id).total {
                    net.stop(id, t);
                } else {
                    net.next_milestone(id, done + piece, t);
                }
            }
        }
        out.into_iter().collect()
    }

    #[test]
    fn one_link_is_shared_equally_and_freed_capacity_is_reused() {
        // Host 0 uploads 1 MB and 2 MB to hosts 1 and 2 at 1 MB/s: both run at 0.5 MB/s until
        // the first ends at 2 s, then the second gets the whole link and ends at 3 s.
        let mut net = Network::new(&[1e6, 1e9, 1e9], &[1e9, 1e9, 1e9]);
        net.start(0, 1, 1e6, 1e6, 0);
        net.start(0, 2, 2e6, 2e6, 0);
        let done = run(&mut net, 1e9);
        assert_eq!(done.len(), 2);
        assert!((done[0].1[0] - 2.0).abs() < 1e-6, "{done:?}");
        assert!((done[1].1[0] - 3.0).abs() < 1e-6, "{done:?}");
        assert!((net.sent[0] - 3e6).abs() < 1.0);
        assert!((net.received[2] - 2e6).abs() < 1.0);
    }

    #[test]
    fn a_flow_runs_at_its_slower_end() {
        // Uplink 10 MB/s, the receiver's downlink 1 MB/s: 1 MB takes 1 s.
        let mut net = Network::new(&[1e7, 1e7], &[1e7, 1e6]);
        net.start(0, 1, 1e6, 1e6, 0);
        let done = run(&mut net, 1e9);
        assert!((done[0].1[0] - 1.0).abs() < 1e-6, "{done:?}");
    }

    #[test]
    fn milestones_fall_on_piece_boundaries() {
        let mut net = Network::new(&[1e6, 1e9], &[1e9, 1e9]);
        net.start(0, 1, 3e6, 1e6, 0);
        let done = run(&mut net, 1e6);
        let times = &done[0].1;
        assert_eq!(times.len(), 3);
        for (k, t) in times.iter().enumerate() {
            assert!((t - (k + 1) as f64).abs() < 1e-6, "{times:?}");
        }
    }

    #[test]
    fn rate_changes_move_milestones_both_ways_and_stopped_flows_leave_the_heap() {
        // Host 0 (1 MB/s up) sends 1 MB to host 1; at 0.5 s a second flow joins (both at
        // 0.5 MB/s) and is cancelled at 1 s: the first has 0.5 + 0.25 MB by then and ends
        // at 1.25 s, the popped milestone falls exactly then, and nothing else is queued.
        let mut net = Network::new(&[1e6, 1e9, 1e9], &[1e9, 1e9, 1e9]);
        let near = |t: Option<Time>, want: Time| t.is_some_and(|t| t.abs_diff(want) <= 2);
        let a = net.start(0, 1, 1e6, 1e6, 0);
        assert!(near(net.next_at(), 1_000_000_000), "{:?}", net.next_at());
        let b = net.start(0, 2, 5e6, 5e6, 500_000_000);
        assert!(near(net.next_at(), 1_500_000_000), "the milestone moved later: {:?}", net.next_at());
        net.stop(b, 1_000_000_000);
        assert!(near(net.next_at(), 1_250_000_000), "and earlier again: {:?}", net.next_at());
        let t = net.next_at().expect("a is live");
        assert_eq!(net.pop(t).map(|(id, _)| id), Some(a));
        assert_eq!(net.next_at(), None);
        assert_eq!(net.counts, [0, 1]);
    }

    #[test]
    fn the_heap_pops_in_time_order_under_churn() {
        let mut net = Network::new(&[1e6; 9], &[1e6; 9]);
        let mut ids = Vec::new();
        for k in 0..8u32 {
            ids.push(net.start(k % 4, 4 + k % 5, 1e5 * f64::from(k + 1), 1e5 * f64::from(k + 1), 0));
        }
        net.stop(ids[3], 10_000_000);
        net.stop(ids[6], 20_000_000);
        let mut last = 0;
        while let Some(t) = net.next_at() {
            assert!(t >= last, "{t} after {last}");
            last = t;
            if let Some((id, _)) = net.pop(t) {
                net.stop(id, t);
            }
        }
        assert!(net.heap.is_empty());
    }
}
