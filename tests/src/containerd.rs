//! A private containerd (root, state and socket in a temp dir) and `ctr content fetch`.
//!
//! Only content plugins matter here: CRI, the `opt` plugin (it creates /opt/containerd)
//! and snapshotters that cannot work in a temp dir are disabled so it boots in ~20 ms
//! and leaves nothing outside its temp dir.
//!
//! [`Containerd::start_cri`] keeps the CRI plugin (kubelet's API, on the same socket) for
//! `PullImage`: images land in its `k8s.io` namespace and are unpacked with the `native`
//! snapshotter (plain copies: it works as root in a sandbox, where overlayfs may not); its
//! registry `config_path` is a hosts directory, as on a node; no CNI (pulls need none).
//!
//! Mirrors are configured the containerd 1.6 way, a `hosts.toml` per registry host under
//! a directory passed with `--hosts-dir`. A `http://` URL in `server` or `[host."..."]`
//! makes that host plain HTTP; no `skip_verify`/`--plain-http` needed. For every request
//! to a host other than the image's own registry, containerd appends
//! `?ns=<registry host>` (URL-encoded: `ns=127.0.0.1%3A5555`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::image::Image;
use crate::process::{run_bounded, CmdOutput, Daemon};
use crate::util::{digest_hex, digest_of_file, find_binary, poll_until, tail_file};

/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "shoaltest";
/// The namespace of the CRI plugin (kubelet's images).
pub const CRI_NAMESPACE: &str = "k8s.io";

const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// How `ctr plugins ls` names it (type and id in two columns).
const CRI_PLUGIN_ID: &str = "cri";

const DISABLED_PLUGINS: &[&str] = &[
    CRI_PLUGIN,
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// A running containerd, killed and its root removed on drop.
pub struct Containerd {
    daemon: Option<Daemon>,
    ctr: PathBuf,
    /// `ctr -n`: [`NAMESPACE`], or [`CRI_NAMESPACE`] with CRI.
    namespace: &'static str,
    socket: PathBuf,
    root: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd with its own root/state/socket and waits for the socket.
    pub async fn start() -> Result<Containerd> {
        Containerd::start_with(None).await
    }

    /// Starts containerd with the CRI plugin, whose registry `config_path` is `hosts_dir`
    /// (the directory `shoal-agent containerd-config --hosts-dir` writes), and waits until the
    /// CRI plugin answers on [`Containerd::socket`].
    pub async fn start_cri(hosts_dir: &Path) -> Result<Containerd> {
        Containerd::start_cri_with(hosts_dir, false).await
    }

    /// [`Containerd::start_cri`] with `discard_unpacked_layers = true` (the default on EKS
    /// and GKE): after unpacking, no image keeps its layers and containerd's GC removes them.
    pub async fn start_cri_discarding_layers(hosts_dir: &Path) -> Result<Containerd> {
        Containerd::start_cri_with(hosts_dir, true).await
    }

    async fn start_cri_with(hosts_dir: &Path, discard_unpacked_layers: bool) -> Result<Containerd> {
        let ctd = Containerd::start_with(Some((hosts_dir, discard_unpacked_layers))).await?;
        // The CRI service registers with the socket's gRPC server after the plugin's init; a
        // CRI call before that gets "unknown service". `ctr plugins ls` shows its status.
        poll_until("the CRI plugin", Duration::from_secs(20), Duration::from_millis(50), || async {
            let out = ctd.ctr(&["plugins", "ls"], Duration::from_secs(10)).await?;
            // TYPE ID PLATFORMS STATUS
            let status = out.stdout.lines().find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.len() >= 3 && cols[1] == CRI_PLUGIN_ID).then(|| cols[cols.len() - 1].to_string())
            });
            match status.as_deref() {
                Some("ok") => Ok(Some(())),
                Some("error") | Some("skip") => {
                    bail!("the CRI plugin did not start ({status:?}):\n{}", ctd.log())
                }
                _ => Ok(None),
            }
        })
        .await?;
        Ok(ctd)
    }

    async fn start_with(cri: Option<(&Path, bool)>) -> Result<Containerd> {
        let cri_hosts_dir = cri.map(|(h, _)| h);
        let discard = cri.is_some_and(|(_, d)| d);
        let binary = find_binary("containerd", "containerd")?;
        let ctr = find_binary("ctr", "containerd")?;
        // Unix socket paths are limited to 108 bytes: keep the dir short.
        let dir = tempfile::Builder::new().prefix("shoal-ctd-").tempdir()?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        let disabled = DISABLED_PLUGINS
            .iter()
            .filter(|p| cri_hosts_dir.is_none() || **p != CRI_PLUGIN)
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let cri = match cri_hosts_dir {
            None => String::new(),
            Some(hosts) => format!(
                "[plugins.\"{CRI_PLUGIN}\"]\n\
                 \x20 disable_tcp_service = true\n\
                 \x20 stream_server_address = \"127.0.0.1\"\n\
                 \x20 stream_server_port = \"0\"\n\
                 \x20 [plugins.\"{CRI_PLUGIN}\".containerd]\n\
                 \x20   snapshotter = \"native\"\n\
                 \x20   discard_unpacked_layers = {discard}\n\
                 \x20 [plugins.\"{CRI_PLUGIN}\".cni]\n\
                 \x20   bin_dir = \"{cni}/bin\"\n\
                 \x20   conf_dir = \"{cni}/net.d\"\n\
                 \x20 [plugins.\"{CRI_PLUGIN}\".registry]\n\
                 \x20   config_path = \"{hosts}\"\n",
                cni = dir.path().join("cni").display(),
                hosts = hosts.display(),
            ),
        };
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 disabled_plugins = [{disabled}]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n  level = \"info\"\n\
                 [metrics]\n  address = \"\"\n\
                 {cri}",
                root = root.display(),
                state = state.display(),
                sock = socket.display(),
            ),
        )?;
        let log_path = dir.path().join("containerd.log");
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(&config);
        let mut daemon = Daemon::spawn("containerd", cmd, &log_path)?;
        let sock = socket.clone();
        poll_until("containerd socket", Duration::from_secs(20), Duration::from_millis(25), || {
            let r = daemon.ensure_running().map(|_| sock.exists().then_some(()));
            async move { r }
        })
        .await
        .with_context(|| format!("containerd log:\n{}", tail_file(&log_path, 4000)))?;
        let namespace = if cri_hosts_dir.is_some() { CRI_NAMESPACE } else { NAMESPACE };
        Ok(Containerd { daemon: Some(daemon), ctr, namespace, socket, root, log_path, dir })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The namespace `ctr` uses ([`NAMESPACE`], or [`CRI_NAMESPACE`] with CRI).
    pub fn namespace(&self) -> &'static str {
        self.namespace
    }

    /// `ctr images pull --plain-http <reference>` straight from a registry (no mirror, no
    /// agent). Err (with ctr's output) on a non-zero exit or after 120 s.
    pub async fn pull_direct(&self, reference: &str) -> Result<CmdOutput> {
        let out = self
            .ctr(&["images", "pull", "--plain-http", "--all-platforms", reference], Duration::from_secs(120))
            .await?;
        if !out.success() {
            bail!(
                "ctr images pull {reference} failed\n{out}\n--- containerd log ---\n{}",
                tail_file(&self.log_path, 3000)
            );
        }
        Ok(out)
    }

    /// A scratch directory inside this containerd's temp dir (e.g. for hosts.toml).
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }

    pub fn log(&self) -> String {
        tail_file(&self.log_path, 16 * 1024)
    }

    /// Runs `ctr --address <sock> -n <namespace> <args>` (`shoaltest`, or `k8s.io` with CRI;
    /// bounded; non-zero exit is returned, not an error).
    pub async fn ctr(&self, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address").arg(&self.socket).args(["-n", self.namespace]).args(args);
        run_bounded(cmd, timeout).await
    }

    /// `ctr content fetch --hosts-dir <dir> --all-platforms [extra] <reference>`.
    /// Err (with ctr's output) on a non-zero exit or after 120 s.
    pub async fn fetch(&self, reference: &str, hosts_dir: &Path, extra_args: &[&str]) -> Result<CmdOutput> {
        let hosts = hosts_dir.to_str().context("hosts dir is not UTF-8")?;
        // Without a hosts.toml for the registry, containerd silently talks to the
        // registry in the reference directly (plain HTTP works for 127.0.0.1), which
        // would bypass the mirror under test.
        let registry = reference.split('/').next().unwrap_or_default();
        let hosts_toml = hosts_dir.join(registry).join("hosts.toml");
        if !hosts_toml.is_file() {
            bail!("{} does not exist: containerd would bypass the mirror", hosts_toml.display());
        }
        let mut args = vec!["content", "fetch", "--hosts-dir", hosts, "--all-platforms"];
        args.extend_from_slice(extra_args);
        args.push(reference);
        let out = self.ctr(&args, Duration::from_secs(120)).await?;
        if !out.success() {
            bail!(
                "ctr content fetch {reference} failed\n{out}\n--- containerd log ---\n{}",
                tail_file(&self.log_path, 3000)
            );
        }
        Ok(out)
    }

    /// Digests in the content store (`ctr content ls -q`).
    pub async fn content_digests(&self) -> Result<Vec<String>> {
        let out = self.ctr(&["content", "ls", "-q"], Duration::from_secs(30)).await?;
        if !out.success() {
            bail!("ctr content ls failed\n{out}");
        }
        Ok(out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("sha256:"))
            .map(str::to_string)
            .collect())
    }

    /// Where containerd keeps the bytes of a digest.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("io.containerd.content.v1.content/blobs/sha256").join(digest_hex(digest))
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest);
        std::fs::read(&p).with_context(|| format!("containerd has no blob {digest} at {}", p.display()))
    }

    /// Checks that every manifest, config and layer of `image` is in the content store,
    /// listed by `ctr content ls`, and byte-identical to what was pushed.
    pub async fn verify_image(&self, image: &Image) -> Result<()> {
        let listed = self.content_digests().await?;
        for m in image.manifests() {
            if !listed.contains(&m.digest) {
                bail!("manifest {} not listed by ctr content ls", m.digest);
            }
            let got = self.read_blob(&m.digest)?;
            if got != m.bytes {
                bail!("manifest {} differs from what was pushed", m.digest);
            }
        }
        for b in &image.blobs {
            if !listed.contains(&b.digest) {
                bail!("blob {} not listed by ctr content ls", b.digest);
            }
            let path = self.blob_path(&b.digest);
            if !crate::util::files_identical(&path, &b.path)? {
                bail!(
                    "blob {} differs from what was pushed (containerd has {} bytes, digest {})",
                    b.digest,
                    std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                    digest_of_file(&path).unwrap_or_default()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }
}

/// Writes `<dir>/<registry_host>/hosts.toml`: `server = server_url` plus, if given, the
/// mirror `[host."<mirror_url>"]` with `capabilities = ["pull", "resolve"]`.
/// Use `http://` URLs for plain HTTP. Returns the file's path.
pub fn write_hosts_toml(
    dir: &Path,
    registry_host: &str,
    mirror_url: Option<&str>,
    server_url: &str,
) -> Result<PathBuf> {
    let host_dir = dir.join(registry_host);
    std::fs::create_dir_all(&host_dir)?;
    let mut text = format!("server = \"{server_url}\"\n");
    if let Some(mirror) = mirror_url {
        text.push_str(&format!("\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"));
    }
    let path = host_dir.join("hosts.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}
