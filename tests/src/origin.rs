//! The origin registry: Debian's `docker-registry` (CNCF distribution 2.8) on loopback.
//!
//! Filesystem storage in a temp dir, deletes enabled, access log on. Tests observe what
//! reached the origin through [`Origin::access_log`], parsed from the gorilla
//! combined-format lines distribution writes next to its logrus lines:
//!
//! ```text
//! 127.0.0.1 - - [23/Nov/2026:14:12:48 +0000] "GET /v2/foo/blobs/sha256:dd84..?ns=x HTTP/1.1" 200 300000 "" "containerd/1.6.20~ds1"
//! ```
//!
//! A line is written when the response has been fully written (or the client went away),
//! so a download still in flight is not in the log yet. `bytes` is what the handler
//! wrote; for HEAD it is the would-be body length (Go discards it), so bandwidth helpers
//! count GETs only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::image::{Image, ImageSpec};
use crate::process::Daemon;
use crate::util::{find_binary, free_port, http_client, poll_until, tail_file};

/// One request as recorded by the origin's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (without `?`), if any.
    pub query: Option<String>,
    pub status: u16,
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessEntry {
    /// `/v2/<name>/blobs/<digest>` (not uploads).
    pub fn is_blob(&self) -> bool {
        self.path.contains("/blobs/") && !self.path.contains("/blobs/uploads")
    }

    /// `/v2/<name>/manifests/<reference>`.
    pub fn is_manifest(&self) -> bool {
        self.path.contains("/manifests/")
    }

    /// The last path segment (digest or tag).
    pub fn reference(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// Parses one combined-format access-log line; `None` for anything else (logrus lines).
pub fn parse_access_line(line: &str) -> Option<AccessEntry> {
    // <ip> <ident> <user> [<time>] "<request>" <status> <bytes> "<referer>" "<ua>"
    let rest = line.split_once("] \"")?.1;
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split(' ');
    let method = req.next()?.to_string();
    let uri = req.next()?;
    let mut fields = rest.trim_start().splitn(3, ' ');
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().unwrap_or(0);
    let tail = fields.next().unwrap_or("");
    // "<referer>" "<ua>"
    let user_agent = tail
        .rsplit_once("\" \"")
        .map(|(_, ua)| ua.trim_end().trim_end_matches('"').to_string())
        .unwrap_or_default();
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (uri.to_string(), None),
    };
    if !path.starts_with('/') {
        return None;
    }
    Some(AccessEntry { method, path, query, status, bytes, user_agent })
}

/// Helpers over a slice of access entries (so tests can diff "before" and "after").
pub trait AccessLogExt {
    fn blob_gets(&self) -> usize;
    fn blob_gets_for(&self, digest: &str) -> usize;
    fn manifest_gets(&self) -> usize;
    fn manifest_heads(&self) -> usize;
    /// Total bytes of blob GET responses (what the origin sent for blobs).
    fn blob_get_bytes(&self) -> u64;
    /// Body bytes the origin sent for one digest in successful (200/206) blob GETs. A
    /// client that fetches a blob in Range pieces still sums to the blob size exactly
    /// once if no byte was fetched twice.
    fn blob_get_bytes_for(&self, digest: &str) -> u64;
}

impl AccessLogExt for [AccessEntry] {
    fn blob_gets(&self) -> usize {
        self.iter().filter(|e| e.method == "GET" && e.is_blob()).count()
    }
    fn blob_gets_for(&self, digest: &str) -> usize {
        self.iter().filter(|e| e.method == "GET" && e.is_blob() && e.reference() == digest).count()
    }
    fn manifest_gets(&self) -> usize {
        self.iter().filter(|e| e.method == "GET" && e.is_manifest()).count()
    }
    fn manifest_heads(&self) -> usize {
        self.iter().filter(|e| e.method == "HEAD" && e.is_manifest()).count()
    }
    fn blob_get_bytes(&self) -> u64 {
        self.iter().filter(|e| e.method == "GET" && e.is_blob()).map(|e| e.bytes).sum()
    }
    fn blob_get_bytes_for(&self, digest: &str) -> u64 {
        self.iter()
            .filter(|e| {
                e.method == "GET"
                    && e.is_blob()
                    && e.reference() == digest
                    && (e.status == 200 || e.status == 206)
            })
            .map(|e| e.bytes)
            .sum()
    }
}

/// A running `docker-registry serve`, killed and its storage removed on drop.
pub struct Origin {
    daemon: Option<Daemon>,
    port: u16,
    binary: PathBuf,
    config: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
}

impl Origin {
    /// Starts a registry on a free 127.0.0.1 port and waits until `GET /v2/` is 200.
    pub async fn start() -> Result<Origin> {
        Origin::start_with(None, "").await
    }

    /// A second registry serving this one's storage, but only to `user`:`password` (HTTP
    /// Basic auth from an htpasswd file, as distribution supports it). Push to `self`, pull
    /// from the locked view.
    pub async fn locked_view(&self, user: &str, password: &str) -> Result<Origin> {
        // distribution accepts only bcrypt entries; Python's crypt module makes them.
        let out = std::process::Command::new("python3")
            .args([
                "-W",
                "ignore",
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                password,
            ])
            .output()
            .context("running python3 to hash the htpasswd entry")?;
        anyhow::ensure!(
            out.status.success(),
            "python3 crypt failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hash = String::from_utf8(out.stdout)?.trim().to_string();
        anyhow::ensure!(hash.starts_with("$2"), "not a bcrypt hash: {hash}");
        let auth = "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {dir}/htpasswd\n";
        Origin::start_with(Some((self.storage_dir(), format!("{user}:{hash}\n"))), auth).await
    }

    /// A second registry serving this one's storage with distribution's token auth: tokens
    /// from `tokens` decide who pulls which repository. Push to `self`, pull from the view.
    pub async fn token_view(&self, tokens: &crate::token::TokenServer) -> Result<Origin> {
        let origin = Origin::start_with_files(
            Some((self.storage_dir(), String::new())),
            &tokens.registry_auth_config(),
            &[("token.pem", tokens.cert_pem())],
        )
        .await?;
        Ok(origin)
    }

    async fn start_with(shared: Option<(PathBuf, String)>, extra_config: &str) -> Result<Origin> {
        Origin::start_with_files(shared, extra_config, &[]).await
    }

    async fn start_with_files(
        shared: Option<(PathBuf, String)>,
        extra_config: &str,
        files: &[(&str, &str)],
    ) -> Result<Origin> {
        let binary = find_binary("docker-registry", "docker-registry")?;
        let dir = tempfile::Builder::new().prefix("shoal-origin-").tempdir()?;
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text)?;
        }
        let port = free_port();
        let storage = match &shared {
            Some((storage, htpasswd)) => {
                std::fs::write(dir.path().join("htpasswd"), htpasswd)?;
                storage.clone()
            }
            None => dir.path().join("storage"),
        };
        std::fs::create_dir_all(&storage)?;
        let extra_config = extra_config.replace("{dir}", &dir.path().display().to_string());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: shoal-test-secret\n{extra_config}",
                storage.display()
            ),
        )?;
        let log_path = dir.path().join("registry.log");
        let mut origin = Origin { daemon: None, port, binary, config, log_path, dir };
        origin.launch().await?;
        Ok(origin)
    }

    async fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve").arg(&self.config);
        self.daemon = Some(Daemon::spawn("docker-registry", cmd, &self.log_path)?);
        let url = format!("{}/v2/", self.url());
        let client = http_client();
        let daemon = self.daemon.as_mut().expect("just set");
        poll_until(
            "docker-registry to answer GET /v2/",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                let ready = daemon.ensure_running();
                let req = client.get(&url).timeout(Duration::from_secs(2)).send();
                async move {
                    ready?;
                    Ok(match req.await {
                        // 401: a locked view (htpasswd) is up too.
                        Ok(resp) if resp.status() == 200 || resp.status() == 401 => Some(()),
                        _ => None,
                    })
                }
            },
        )
        .await
        .with_context(|| format!("origin log:\n{}", tail_file(&self.log_path, 4000)))
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT` (the registry host as it appears in image references).
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log (logrus + access lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Every access-log entry so far, in order.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        self.log().lines().filter_map(parse_access_line).collect()
    }

    /// Access entries after the first `skip` (use `access_log().len()` as a mark).
    pub fn access_log_since(&self, mark: usize) -> Vec<AccessEntry> {
        self.access_log().into_iter().skip(mark).collect()
    }

    pub fn blob_gets(&self) -> usize {
        self.access_log().blob_gets()
    }

    pub fn manifest_gets(&self) -> usize {
        self.access_log().manifest_gets()
    }

    pub fn manifest_heads(&self) -> usize {
        self.access_log().manifest_heads()
    }

    pub fn blob_get_bytes(&self) -> u64 {
        self.access_log().blob_get_bytes()
    }

    /// Kills the registry (the port stops answering; storage is kept).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// Starts the registry again on the same port with the same storage.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch().await
    }

    pub fn is_running(&self) -> bool {
        self.daemon.is_some()
    }

    /// Builds an image from `spec` and pushes it here with skopeo.
    pub async fn push(&self, spec: &ImageSpec) -> Result<Image> {
        let mut image = Image::build(spec)?;
        image.push(&self.host()).await?;
        Ok(image)
    }

    /// The storage root (for tests that want to tamper with the origin's files).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_lines() {
        let line = r#"127.0.0.1 - - [23/Nov/2026:14:12:48 +0000] "GET /v2/foo/bar/blobs/sha256:dd84?ns=127.0.0.1%3A15555 HTTP/1.1" 200 300000 "" "containerd/1.6.20~ds1""#;
        let e = parse_access_line(line).unwrap();
        assert_eq!(e.method, "GET");
        assert_eq!(e.path, "/v2/foo/bar/blobs/sha256:dd84");
        assert_eq!(e.query.as_deref(), Some("ns=127.0.0.1%3A15555"));
        assert_eq!(e.status, 200);
        assert_eq!(e.bytes, 300000);
        assert_eq!(e.user_agent, "containerd/1.6.20~ds1");
        assert!(e.is_blob());
        assert_eq!(e.reference(), "sha256:dd84");

        let head = r#"127.0.0.1 - - [23/Nov/2026:14:12:26 +0000] "HEAD /v2/foo/bar/manifests/v1 HTTP/1.1" 200 499 "" "curl/7.88.1""#;
        let e = parse_access_line(head).unwrap();
        assert_eq!((e.method.as_str(), e.is_manifest(), e.query), ("HEAD", true, None));

        let logrus = r#"time="2026-11-23T14:12:21Z" level=info msg="listening on 127.0.0.1:15555""#;
        assert_eq!(parse_access_line(logrus), None);

        let entries = [parse_access_line(line).unwrap(), parse_access_line(head).unwrap()];
        assert_eq!(entries.blob_gets(), 1);
        assert_eq!(entries.manifest_heads(), 1);
        assert_eq!(entries.blob_get_bytes(), 300000);
        assert_eq!(entries.blob_gets_for("sha256:dd84"), 1);
        assert_eq!(entries.blob_get_bytes_for("sha256:dd84"), 300000);
        assert_eq!(entries.blob_get_bytes_for("sha256:other"), 0);
    }
}
