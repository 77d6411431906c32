//! The benchmark network: one network namespace per node, one for the origin and one for the
//! tracker, joined by veth pairs to a bridge in a "hub" namespace, with `tc tbf` shaping.
//!
//! ```text
//!   <p>-origin  198.18.0.1   veth <p>o  ==tbf origin rate==>  <p>O ─┐
//!   <p>-tracker 198.18.0.2   veth <p>t  (unshaped)                <p>T ─┤  bridge "br0" in <p>-hub
//!   <p>-n0      198.18.1.1   veth <p>n0 ==tbf node rate==> <p>N0 ─┤  (no address: the root
//!   ...                                 <==tbf node rate==        ─┘   namespace is untouched)
//! ```
//!
//! `<p>` is `shb<pid>`, unique per run, so two runs never collide and cleanup removes only what
//! this run made. Interface names stay within Linux's 15 characters.
//!
//! Why shaping sits where it does: `tbf` shapes what an interface *sends*. The origin's uplink
//! is its veth's egress. A node's upload is its own veth's egress and its download is the egress
//! of the bridge port facing it, so both get the node rate: a node can neither receive nor serve
//! faster than its link, as on a real NIC. (`netem` is not available on this kernel; `tbf` is.)
//!
//! Origin egress is read from the origin namespace's interface counter (`tx_bytes` of its veth),
//! i.e. what actually left the origin, headers included, not what the agents claim.
//!
//! [`Net`] removes every namespace on drop (deleting a namespace destroys its veths and the
//! bridge with it), so a failed or interrupted run leaves nothing behind; processes must be
//! stopped first, which the owner of the `Net` arranges by dropping them earlier.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The origin's address (TEST-NET for benchmarks, RFC 2544: 198.18.0.0/15).
pub const ORIGIN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The tracker's address.
pub const TRACKER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Node `i`'s address: 198.18.1.1, 198.18.1.2, ... (250 per /24, up to 250 × 254 nodes).
pub fn node_ip(i: usize) -> Ipv4Addr {
    let i = i as u32;
    Ipv4Addr::new(198, 18, (1 + i / 250) as u8, (1 + i % 250) as u8)
}

/// A link rate in bits per second, parsed from `200mbit`, `1gbit`, `500kbit`, `1000000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl Rate {
    pub fn bytes_per_sec(self) -> f64 {
        self.0 as f64 / 8.0
    }

    /// The `tc` spelling, in bits per second.
    fn tc(self) -> String {
        format!("{}bit", self.0)
    }

    /// A token bucket of 10 ms worth of bytes (at least 64 KiB, enough for one GSO segment),
    /// so the shaper neither starves at high rates nor lets long bursts through at low ones.
    fn burst_bytes(self) -> u64 {
        ((self.0 / 8) / 100).max(64 << 10)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b.is_multiple_of(1_000_000_000) {
            write!(f, "{}gbit", b / 1_000_000_000)
        } else if b.is_multiple_of(1_000_000) {
            write!(f, "{}mbit", b / 1_000_000)
        } else if b.is_multiple_of(1000) {
            write!(f, "{}kbit", b / 1000)
        } else {
            write!(f, "{b}bit")
        }
    }
}

pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = [("gbit", 1_000_000_000u64), ("mbit", 1_000_000), ("kbit", 1000), ("bit", 1)]
        .iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.to_string(), *m)))
        .unwrap_or((t.clone(), 1));
    let n: f64 = num.trim().parse().map_err(|e| format!("{s:?}: {e} (expected e.g. 200mbit, 1gbit)"))?;
    if n.is_nan() || n <= 0.0 {
        return Err(format!("{s:?}: a rate must be positive"));
    }
    Ok(Rate((n * mult as f64).round() as u64))
}

/// Runs a command to completion (these are all quick `ip`/`tc` calls); an error carries stderr.
fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One namespace with one veth into the hub.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    /// The veth inside `netns`.
    pub ifname: String,
    /// Its bridge-side peer in the hub namespace.
    pub hub_ifname: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// `ip netns exec <ns> <program> <args...>` as a command to spawn.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }
}

/// The whole topology. Dropping it deletes every namespace it created.
pub struct Net {
    prefix: String,
    /// Namespaces created so far (deleted in reverse order on drop).
    namespaces: Vec<String>,
    pub origin: Host,
    pub tracker: Host,
    pub nodes: Vec<Host>,
}

impl Net {
    /// Checks for root and the `ip`/`tc` tools, then builds the topology for `nodes` nodes.
    /// Anything created before a failure is removed again (the partly built `Net` is dropped).
    pub fn create(nodes: usize, origin_rate: Rate, node_rate: Rate) -> Result<Net> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            bail!("network namespaces and tc need root: run as root, or use --loopback (no shaping)");
        }
        for tool in ["ip", "tc"] {
            shoal_tests::util::find_binary(tool, "iproute2")?;
        }
        let prefix = format!("shb{}", std::process::id());
        let host = |name: &str, short: &str, ip| Host {
            netns: format!("{prefix}-{name}"),
            ifname: format!("{prefix}{short}"),
            hub_ifname: format!("{prefix}{}", short.to_ascii_uppercase()),
            ip,
        };
        let mut net = Net {
            origin: host("origin", "o", ORIGIN_IP),
            tracker: host("tracker", "t", TRACKER_IP),
            nodes: (0..nodes).map(|i| host(&format!("n{i}"), &format!("n{i}"), node_ip(i))).collect(),
            namespaces: Vec::new(),
            prefix,
        };
        for h in std::iter::once(&net.origin).chain(std::iter::once(&net.tracker)).chain(&net.nodes) {
            if h.ifname.len() > 15 {
                bail!("interface name {} is longer than 15 characters", h.ifname);
            }
        }
        let hub = net.hub();
        net.add_netns(&hub)?;
        run(&["ip", "-n", &hub, "link", "add", "name", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        let origin = net.origin.clone();
        net.attach(&origin)?;
        shape(&origin.netns, &origin.ifname, origin_rate)?;
        let tracker = net.tracker.clone();
        net.attach(&tracker)?;
        for node in net.nodes.clone() {
            net.attach(&node)?;
            shape(&node.netns, &node.ifname, node_rate)?;
            shape(&hub, &node.hub_ifname, node_rate)?;
        }
        Ok(net)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hub namespace, where the bridge and every host's bridge-side veth live.
    pub fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Creates `h`'s namespace and its veth pair, plugs the peer into the bridge, sets the
    /// address. The pair is created in the hub namespace so the root namespace never sees it.
    fn attach(&mut self, h: &Host) -> Result<()> {
        let hub = self.hub();
        self.add_netns(&h.netns)?;
        run(&[
            "ip",
            "-n",
            &hub,
            "link",
            "add",
            "name",
            &h.hub_ifname,
            "type",
            "veth",
            "peer",
            "name",
            &h.ifname,
        ])?;
        run(&["ip", "-n", &hub, "link", "set", &h.ifname, "netns", &h.netns])?;
        run(&["ip", "-n", &hub, "link", "set", &h.hub_ifname, "master", "br0"])?;
        run(&["ip", "-n", &hub, "link", "set", &h.hub_ifname, "up"])?;
        run(&["ip", "-n", &h.netns, "addr", "add", &format!("{}/15", h.ip), "dev", &h.ifname])?;
        run(&["ip", "-n", &h.netns, "link", "set", &h.ifname, "up"])?;
        Ok(())
    }

    /// Bytes the origin's interface has sent so far (`tx_bytes`, frames with headers).
    pub fn origin_tx_bytes(&self) -> Result<u64> {
        tx_bytes(&self.origin.netns, &self.origin.ifname)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = run(&["ip", "netns", "del", &ns]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

/// `tc qdisc replace dev <ifname> root tbf rate R burst B latency 100ms` inside `netns`.
fn shape(netns: &str, ifname: &str, rate: Rate) -> Result<()> {
    let burst = rate.burst_bytes().to_string();
    run(&[
        "ip",
        "netns",
        "exec",
        netns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        ifname,
        "root",
        "tbf",
        "rate",
        &rate.tc(),
        "burst",
        &burst,
        "latency",
        "100ms",
    ])
    .map(|_| ())
}

/// `stats64.tx.bytes` of `ifname` in `netns`, from `ip -s -j link`.
pub fn tx_bytes(netns: &str, ifname: &str) -> Result<u64> {
    let out = run(&["ip", "-n", netns, "-s", "-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("parsing `ip -j`: {out}"))?;
    v[0]["stats64"]["tx"]["bytes"].as_u64().with_context(|| format!("no stats64.tx.bytes in {out}"))
}

/// Removes namespaces a killed earlier run left behind (`shb<pid>-*` whose pid is gone).
pub fn remove_stale() -> Result<Vec<String>> {
    let out = run(&["ip", "netns", "list"])?;
    let mut removed = Vec::new();
    for name in out.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("shb").and_then(|r| r.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        run(&["ip", "netns", "del", name])?;
        removed.push(name.to_string());
    }
    Ok(removed)
}
