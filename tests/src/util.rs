//! Small shared helpers: loopback ports, binaries, hashing, bounded polling, HTTP client.

use std::collections::HashSet;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

/// Every manifest media type a pull client accepts (what containerd sends, minus `*/*`).
pub const MANIFEST_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// Ports handed out by [`free_port`] in this process, never handed out twice, so tests
/// running in parallel threads cannot be given the same port.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that was free a moment ago and that no other caller in this
/// process has been given.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("could not find an unused loopback port in 200 attempts");
}

/// A URL on 127.0.0.1 where nothing listens (a reserved port that is never bound).
/// Used as hosts.toml `server` / registries.conf `location` so that a client that
/// ignores or gives up on the mirror fails instead of silently going to the origin.
pub fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// The workspace root (`tests/..`).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests crate has a parent dir").to_path_buf()
}

/// A binary of this workspace: `$<env_var>` if set, else `$CARGO_TARGET_DIR/debug/<name>` (if
/// that variable is an absolute path), else `<workspace>/target/debug/<name>`; an error telling
/// how to build it if missing. The harness never builds binaries itself.
pub fn workspace_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    let path = if let Some(p) = std::env::var_os(env_var) {
        PathBuf::from(p)
    } else {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| workspace_dir().join("target"));
        target.join("debug").join(name)
    };
    if !path.is_file() {
        bail!(
            "{name} binary {} not found: run `cargo build --bins` in {} first (or set {env_var})",
            path.display(),
            workspace_dir().display()
        );
    }
    Ok(path)
}

/// Finds an executable on PATH (or the usual Debian locations); a clear error if missing.
pub fn find_binary(name: &str, debian_package: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/bin", "/usr/sbin", "/bin", "/usr/local/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "required binary `{name}` not found on PATH; install the Debian package \
         `{debian_package}` (apt-get install -y {debian_package})"
    )
}

/// `sha256:<hex>` of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The index in `peers` of the coordinator of `digest` (`sha256:<hex>`): the peer XOR-closest
/// to the digest's DHT key, measured as the agent's swarm measures it (`kad::KBucketKey` of
/// the digest's 32 raw bytes). `None` for an empty list or a digest that is not hex.
pub fn coordinator_index(peers: &[libp2p::PeerId], digest: &str) -> Option<usize> {
    use libp2p::kad::KBucketKey;
    let raw = hex::decode(digest.strip_prefix("sha256:")?).ok()?;
    let target = KBucketKey::new(raw);
    (0..peers.len()).min_by_key(|&i| KBucketKey::from(peers[i]).distance(&target))
}

/// `sha256:<hex>` of a file. Uses coreutils `sha256sum` when available: the `sha2` crate
/// runs at ~30 MB/s in an unoptimised test build, `sha256sum` at several hundred MB/s.
pub fn digest_of_file(path: &Path) -> Result<String> {
    if let Ok(bin) = find_binary("sha256sum", "coreutils") {
        let out = std::process::Command::new(bin)
            .arg("--")
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("sha256sum {}", path.display()))?;
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(hex) = text.split_whitespace().next().filter(|h| h.len() == 64) {
                return Ok(format!("sha256:{hex}"));
            }
        }
    }
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The hex part of `sha256:<hex>`.
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Whether two files hold exactly the same bytes (streamed comparison).
pub fn files_identical(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The last `max_bytes` of a (log) file, lossily decoded; empty if unreadable.
pub fn tail_file(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The HTTP client every test uses: loopback only (system proxies ignored), bounded.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .expect("build reqwest client")
}

/// Polls `check` every `interval` until it returns `Ok(Some(v))`, at most `timeout`.
/// `Ok(None)` means "not yet"; `Err` aborts at once (e.g. the process died).
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let max_rounds = (timeout.as_millis() / interval.as_millis().max(1)) as u64 + 2;
    for _ in 0..max_rounds {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(interval).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Environment variables removed from every child process: proxies (all traffic
/// stays on 127.0.0.1) and the agent's own `SHOAL_*` flag variables.
pub fn scrub_env(cmd: &mut std::process::Command) {
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("SHOAL_") {
                cmd.env_remove(k);
            }
        }
    }
}

/// Flips one bit of the file at `offset` (a damaged disk, for integrity tests).
pub fn flip_bit(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes[offset as usize] ^= 0x10;
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Bytes of the regular files under `dir` (0 when it does not exist).
pub fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { bytes_under(&entry.path()) } else { meta.len() };
    }
    total
}

#[cfg(test)]
mod tests {
    /// Kademlia's distance written out: sha256 of the peer id's bytes XOR sha256 of the key.
    #[test]
    fn the_coordinator_is_the_xor_closest_peer() {
        use sha2::{Digest as _, Sha256};
        let raw = [0xab_u8; 32];
        let digest = format!("sha256:{}", hex::encode(raw));
        let target: [u8; 32] = Sha256::digest(raw).into();
        for _ in 0..20 {
            let peers: Vec<libp2p::PeerId> = (0..8).map(|_| libp2p::PeerId::random()).collect();
            let xor = |p: &libp2p::PeerId| -> [u8; 32] {
                let key: [u8; 32] = Sha256::digest(p.to_bytes()).into();
                std::array::from_fn(|b| key[b] ^ target[b])
            };
            let expected = (0..peers.len()).min_by_key(|&i| xor(&peers[i])).unwrap();
            assert_eq!(super::coordinator_index(&peers, &digest), Some(expected));
        }
        assert_eq!(super::coordinator_index(&[], &digest), None);
        assert_eq!(super::coordinator_index(&[libp2p::PeerId::random()], "sha256:zz"), None);
    }
}
