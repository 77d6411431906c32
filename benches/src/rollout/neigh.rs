//! The kernel's neighbour (ARP) table limits, raised for a namespace run and put back after.
//!
//! Every network namespace shares one IPv4 neighbour table whose size limits are global
//! (`net.ipv4.neigh.default.gc_thresh1/2/3`, only settable from the root namespace). The
//! default hard limit is 1,024 entries; N agents meshed on one L2 segment need up to N² of
//! them, so at 40 nodes the kernel logs `neighbor table overflow!`, drops ARP resolutions, and
//! nodes fail for a reason that has nothing to do with Shoal (issue 12). A real cluster on a
//! flat L2 network hits the same limit when every agent talks to many peers.
//!
//! [`NeighLimits::raise`] raises each limit that is below [`TARGET`] (never lowers one) and
//! returns a guard that writes the old values back when dropped: on a normal exit, on a
//! failure, and on Ctrl-C/SIGTERM (the run future is dropped, like the namespaces). The old
//! values are also saved in [`STATE_FILE`] until restored, so a run that was SIGKILLed is
//! undone by the next run ([`restore_stale`]), as stale namespaces are.
//!
//! The benchmark uses IPv4 only (198.18.0.0/15, agents listen on `/ip4`), so the IPv6 table
//! (`net.ipv6.neigh.default.*`) is left alone.

use std::path::Path;

use anyhow::{Context, Result};

const DIR: &str = "/proc/sys/net/ipv4/neigh/default";
/// gc_thresh1/2/3 for the run: far above 80 × 80 entries.
pub const TARGET: [u64; 3] = [8192, 32768, 65536];
/// Old values and the pid of the run that changed them, while it runs.
pub const STATE_FILE: &str = "/run/shoal-benches-neigh";

fn path(k: usize) -> String {
    format!("{DIR}/gc_thresh{}", k + 1)
}

fn read() -> Result<[u64; 3]> {
    let mut v = [0; 3];
    for (k, slot) in v.iter_mut().enumerate() {
        let p = path(k);
        *slot = std::fs::read_to_string(&p)
            .with_context(|| format!("reading {p}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {p}"))?;
    }
    Ok(v)
}

/// Writes `values`; thresholds are written from 3 down when raising and from 1 up when
/// lowering, so gc_thresh1 ≤ 2 ≤ 3 holds after every single write.
fn write(values: [u64; 3], raising: bool) -> Result<()> {
    let order: [usize; 3] = if raising { [2, 1, 0] } else { [0, 1, 2] };
    for k in order {
        let p = path(k);
        std::fs::write(&p, values[k].to_string()).with_context(|| format!("writing {p}"))?;
    }
    Ok(())
}

fn show(v: [u64; 3]) -> String {
    format!("{}/{}/{}", v[0], v[1], v[2])
}

/// Restores the values a killed earlier run left raised (its pid is gone); returns what it
/// restored.
pub fn restore_stale() -> Result<Option<String>> {
    let Ok(text) = std::fs::read_to_string(STATE_FILE) else { return Ok(None) };
    let nums: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let [pid, a, b, c] = nums[..] else {
        let _ = std::fs::remove_file(STATE_FILE);
        return Ok(None);
    };
    if pid as u32 != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
        return Ok(None); // another run is using them
    }
    write([a, b, c], false)?;
    std::fs::remove_file(STATE_FILE).with_context(|| format!("removing {STATE_FILE}"))?;
    Ok(Some(show([a, b, c])))
}

/// Raised limits; dropping it writes the old values back.
pub struct NeighLimits {
    old: [u64; 3],
    new: [u64; 3],
}

impl NeighLimits {
    /// Raises every limit below [`TARGET`] to it. `None` when all are high enough already.
    pub fn raise() -> Result<Option<NeighLimits>> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            anyhow::bail!(
                "network namespaces, tc and sysctls need root: run as root, or use --loopback (no shaping)"
            );
        }
        let old = read()?;
        let new = [0, 1, 2].map(|k| old[k].max(TARGET[k]));
        if new == old {
            return Ok(None);
        }
        std::fs::write(STATE_FILE, format!("{} {} {} {}\n", std::process::id(), old[0], old[1], old[2]))
            .with_context(|| format!("writing {STATE_FILE}"))?;
        if let Err(e) = write(new, true) {
            let _ = write(old, false);
            let _ = std::fs::remove_file(STATE_FILE);
            return Err(e);
        }
        Ok(Some(NeighLimits { old, new }))
    }

    pub fn describe(&self) -> String {
        format!(
            "raised the kernel's neighbour table limits net.ipv4.neigh.default.gc_thresh1/2/3 from {} to {} \
             for this run (restored on exit)",
            show(self.old),
            show(self.new)
        )
    }
}

impl Drop for NeighLimits {
    fn drop(&mut self) {
        // Put back only what is still ours: someone may have changed a value meanwhile.
        let now = read().unwrap_or(self.new);
        let back = [0, 1, 2].map(|k| if now[k] == self.new[k] { self.old[k] } else { now[k] });
        match write(back, false) {
            Ok(()) => {
                let _ = std::fs::remove_file(STATE_FILE);
                eprintln!("restored net.ipv4.neigh.default.gc_thresh1/2/3 to {}", show(back));
            }
            Err(e) => eprintln!("cleanup: restoring the neighbour table limits: {e:#}"),
        }
    }
}
