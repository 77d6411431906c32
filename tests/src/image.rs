//! Test images: random layers, exact manifest bytes, pushed with skopeo unchanged.
//!
//! An image is written as a skopeo `dir:` layout (`version`, `manifest.json`, blobs named
//! by hex digest, list instances as `<hex>.manifest.json`) and copied to the registry with
//! `skopeo copy --all --preserve-digests`, which keeps our manifest bytes (checked after
//! the push: the registry's `Docker-Content-Digest` for the tag must equal the sha256 of
//! the bytes we wrote). Layers are random bytes from a fast seeded RNG, streamed to disk
//! while hashing, so images of hundreds of MiB are never held in memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use serde_json::json;
use tempfile::TempDir;

use crate::process::run_checked;
use crate::util::{digest_hex, digest_of, digest_of_file, find_binary, http_client};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The four manifest shapes a mirror must pass through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Single OCI image manifest.
    OciManifest,
    /// OCI image index with linux/amd64 and linux/arm64 manifests.
    OciIndex,
    /// Docker v2 schema 2 manifest.
    DockerManifest,
    /// Docker manifest list with linux/amd64 and linux/arm64 manifests.
    DockerList,
}

impl ImageKind {
    pub const ALL: [ImageKind; 4] =
        [ImageKind::OciManifest, ImageKind::OciIndex, ImageKind::DockerManifest, ImageKind::DockerList];

    pub fn is_list(self) -> bool {
        matches!(self, ImageKind::OciIndex | ImageKind::DockerList)
    }

    fn is_oci(self) -> bool {
        matches!(self, ImageKind::OciManifest | ImageKind::OciIndex)
    }

    /// Media type of the top-level manifest (what the tag points at).
    pub fn top_media_type(self) -> &'static str {
        match self {
            ImageKind::OciManifest => OCI_MANIFEST,
            ImageKind::OciIndex => OCI_INDEX,
            ImageKind::DockerManifest => DOCKER_MANIFEST,
            ImageKind::DockerList => DOCKER_LIST,
        }
    }

    fn image_manifest_type(self) -> &'static str {
        if self.is_oci() {
            OCI_MANIFEST
        } else {
            DOCKER_MANIFEST
        }
    }

    fn config_type(self) -> &'static str {
        if self.is_oci() {
            OCI_CONFIG
        } else {
            DOCKER_CONFIG
        }
    }

    fn layer_type(self) -> &'static str {
        if self.is_oci() {
            OCI_LAYER
        } else {
            DOCKER_LAYER
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub kind: ImageKind,
    pub repo: String,
    pub tag: String,
    /// Layer sizes in bytes, per platform (lists get this many layers per platform).
    pub layer_sizes: Vec<u64>,
    pub seed: u64,
    /// Each layer is a tar holding one file of random bytes (the size is the file's), so
    /// containerd can unpack it (CRI `PullImage` does). OCI kinds only: their layers are
    /// uncompressed tars.
    pub tar_layers: bool,
}

impl ImageSpec {
    /// Two small layers (256 KiB and 384 KiB + 17 bytes), random seed.
    pub fn new(kind: ImageKind, repo: &str, tag: &str) -> ImageSpec {
        ImageSpec {
            kind,
            repo: repo.to_string(),
            tag: tag.to_string(),
            layer_sizes: vec![256 * 1024, 384 * 1024 + 17],
            seed: rand::random(),
            tar_layers: false,
        }
    }

    pub fn layers(mut self, sizes: &[u64]) -> ImageSpec {
        self.layer_sizes = sizes.to_vec();
        self
    }

    pub fn seed(mut self, seed: u64) -> ImageSpec {
        self.seed = seed;
        self
    }

    /// Layers containerd can unpack (see [`ImageSpec::tar_layers`]).
    pub fn unpackable(mut self) -> ImageSpec {
        self.tar_layers = true;
        self
    }
}

/// A manifest we wrote (top-level or a list instance).
#[derive(Debug, Clone)]
pub struct ManifestInfo {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// `linux/amd64` etc. for list instances.
    pub platform: Option<String>,
}

/// A config or layer blob, stored in the image's dir (read it when needed).
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub path: PathBuf,
}

impl Blob {
    pub fn read(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.path).with_context(|| format!("read {}", self.path.display()))
    }

    pub fn is_layer(&self) -> bool {
        self.media_type == OCI_LAYER || self.media_type == DOCKER_LAYER
    }
}

/// A built (and, after [`Image::push`], pushed) image. Owns its `dir:` layout.
#[derive(Debug)]
pub struct Image {
    pub kind: ImageKind,
    /// `127.0.0.1:PORT` once pushed; empty before.
    pub registry: String,
    pub repo: String,
    pub tag: String,
    /// The manifest the tag points at.
    pub manifest: ManifestInfo,
    /// List instances (empty for single manifests).
    pub children: Vec<ManifestInfo>,
    /// Every config and layer blob, in manifest order.
    pub blobs: Vec<Blob>,
    dir: TempDir,
}

impl Image {
    /// Writes the `dir:` layout for `spec` into a fresh temp dir.
    pub fn build(spec: &ImageSpec) -> Result<Image> {
        let dir = tempfile::Builder::new().prefix("shoal-image-").tempdir()?;
        let kind = spec.kind;
        ensure!(!spec.tar_layers || kind.is_oci(), "tar layers are for OCI images (uncompressed layers)");
        let mut rng = SmallRng::seed_from_u64(spec.seed);
        let mut blobs = Vec::new();
        let platforms: &[&str] = if kind.is_list() { &["amd64", "arm64"] } else { &["amd64"] };
        let mut children = Vec::new();
        for arch in platforms {
            let mut layers = Vec::new();
            for (i, &size) in spec.layer_sizes.iter().enumerate() {
                let blob = if spec.tar_layers {
                    write_tar_blob(dir.path(), &mut rng, size, &format!("shoal-{arch}-{i}"))?
                } else {
                    write_random_blob(dir.path(), &mut rng, size, kind.layer_type())?
                };
                layers.push(blob);
            }
            let config = json!({
                "architecture": arch,
                "os": "linux",
                "created": "2026-01-01T00:00:00Z",
                "config": { "Labels": { "shoal.test.seed": spec.seed.to_string() } },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(),
                },
                "history": layers.iter().map(|_| json!({"created_by": "shoal-tests"})).collect::<Vec<_>>(),
            });
            let config_bytes = serde_json::to_vec(&config)?;
            let config_blob = write_blob(dir.path(), &config_bytes, kind.config_type())?;
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": kind.image_manifest_type(),
                "config": descriptor(&config_blob.media_type, &config_blob.digest, config_blob.size),
                "layers": layers.iter().map(|l| descriptor(&l.media_type, &l.digest, l.size)).collect::<Vec<_>>(),
            });
            let bytes = serde_json::to_vec_pretty(&manifest)?;
            children.push(ManifestInfo {
                digest: digest_of(&bytes),
                media_type: kind.image_manifest_type().to_string(),
                bytes,
                platform: Some(format!("linux/{arch}")),
            });
            blobs.push(config_blob);
            blobs.extend(layers);
        }
        let manifest = if kind.is_list() {
            let list = json!({
                "schemaVersion": 2,
                "mediaType": kind.top_media_type(),
                "manifests": children.iter().map(|c| {
                    let arch = c.platform.as_deref().unwrap_or("linux/amd64").trim_start_matches("linux/");
                    let mut d = descriptor(&c.media_type, &c.digest, c.bytes.len() as u64);
                    d["platform"] = json!({"architecture": arch, "os": "linux"});
                    d
                }).collect::<Vec<_>>(),
            });
            for child in &children {
                std::fs::write(
                    dir.path().join(format!("{}.manifest.json", digest_hex(&child.digest))),
                    &child.bytes,
                )?;
            }
            let bytes = serde_json::to_vec_pretty(&list)?;
            ManifestInfo {
                digest: digest_of(&bytes),
                media_type: kind.top_media_type().to_string(),
                bytes,
                platform: None,
            }
        } else {
            let mut only = children.pop().expect("one platform");
            only.platform = None;
            only
        };
        std::fs::write(dir.path().join("manifest.json"), &manifest.bytes)?;
        std::fs::write(dir.path().join("version"), "Directory Transport Version: 1.1\n")?;
        Ok(Image {
            kind,
            registry: String::new(),
            repo: spec.repo.clone(),
            tag: spec.tag.clone(),
            manifest,
            children,
            blobs,
            dir,
        })
    }

    /// `registry/repo:tag`
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repo, self.tag)
    }

    /// `registry/repo@digest`
    pub fn digest_reference(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repo, self.manifest.digest)
    }

    /// The skopeo `dir:` layout.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Top-level manifest first, then list instances.
    pub fn manifests(&self) -> impl Iterator<Item = &ManifestInfo> {
        std::iter::once(&self.manifest).chain(self.children.iter())
    }

    pub fn layers(&self) -> impl Iterator<Item = &Blob> {
        self.blobs.iter().filter(|b| b.is_layer())
    }

    pub fn largest_layer(&self) -> &Blob {
        self.layers().max_by_key(|b| b.size).expect("image has layers")
    }

    /// Sum of config and layer sizes (manifests not included).
    pub fn total_blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }

    /// Every digest a full pull fetches: manifests, configs, layers.
    pub fn all_digests(&self) -> Vec<String> {
        self.manifests()
            .map(|m| m.digest.clone())
            .chain(self.blobs.iter().map(|b| b.digest.clone()))
            .collect()
    }

    pub fn blob(&self, digest: &str) -> Option<&Blob> {
        self.blobs.iter().find(|b| b.digest == digest)
    }

    /// The exact bytes behind a digest of this image (manifest or blob).
    pub fn content_of(&self, digest: &str) -> Option<Vec<u8>> {
        if let Some(m) = self.manifests().find(|m| m.digest == digest) {
            return Some(m.bytes.clone());
        }
        self.blob(digest).and_then(|b| b.read().ok())
    }

    /// Pushes with `skopeo copy --all --preserve-digests` to `registry_host` (plain HTTP)
    /// and checks that the tag resolves to the digest of our manifest bytes.
    pub async fn push(&mut self, registry_host: &str) -> Result<()> {
        let skopeo = find_binary("skopeo", "skopeo")?;
        let tmp = tempfile::Builder::new().prefix("shoal-skopeo-").tempdir()?;
        let conf = tmp.path().join("registries.conf");
        std::fs::write(&conf, "unqualified-search-registries = []\n")?;
        let dest = format!("docker://{}/{}:{}", registry_host, self.repo, self.tag);
        let mut cmd = Command::new(skopeo);
        cmd.arg("--insecure-policy")
            .arg("--registries-conf")
            .arg(&conf)
            .arg("--tmpdir")
            .arg(tmp.path())
            .args(["copy", "--all", "--preserve-digests", "--quiet"])
            .args(["--dest-tls-verify=false", "--dest-no-creds"])
            .arg(format!("dir:{}", self.dir().display()))
            .arg(&dest)
            .env("HOME", tmp.path());
        // ~50 MB/s worst case on loopback plus fixed overhead.
        let secs = 60 + self.total_blob_bytes() / (50 << 20);
        run_checked(cmd, Duration::from_secs(secs))
            .await
            .with_context(|| format!("skopeo push to {dest}"))?;

        let url = format!("http://{registry_host}/v2/{}/manifests/{}", self.repo, self.tag);
        let resp = http_client().head(&url).header("Accept", &self.manifest.media_type).send().await?;
        ensure!(resp.status() == 200, "HEAD {url} after push: {}", resp.status());
        let got = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if got != self.manifest.digest {
            bail!(
                "registry stores {got} for {dest} but our manifest bytes hash to {}; \
                 skopeo rewrote the manifest",
                self.manifest.digest
            );
        }
        self.registry = registry_host.to_string();
        Ok(())
    }
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": digest, "size": size })
}

fn write_blob(dir: &Path, bytes: &[u8], media_type: &str) -> Result<Blob> {
    let digest = digest_of(bytes);
    let path = dir.join(digest_hex(&digest));
    std::fs::write(&path, bytes)?;
    Ok(Blob { digest, size: bytes.len() as u64, media_type: media_type.to_string(), path })
}

/// Streams `size` random bytes to a file, hashes it, then names it by digest.
fn write_random_blob(dir: &Path, rng: &mut SmallRng, size: u64, media_type: &str) -> Result<Blob> {
    let tmp_path = dir.join(format!("partial-{}", rng.next_u64()));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp_path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    drop(file);
    let digest = digest_of_file(&tmp_path)?;
    let path = dir.join(digest_hex(&digest));
    std::fs::rename(&tmp_path, &path)?;
    Ok(Blob { digest, size, media_type: media_type.to_string(), path })
}

/// A POSIX tar (ustar) with one regular file `name` of `size` random bytes, as an OCI layer.
fn write_tar_blob(dir: &Path, rng: &mut SmallRng, size: u64, name: &str) -> Result<Blob> {
    ensure!(name.len() < 100, "tar member name too long");
    let mut header = [0u8; 512];
    let mut field = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
    field(0, name.as_bytes());
    field(100, b"0000644\0");
    field(108, b"0000000\0");
    field(116, b"0000000\0");
    field(124, format!("{size:011o}\0").as_bytes());
    field(136, b"15125334400\0"); // 2026-01-01 00:00 UTC
    field(148, b"        "); // the checksum counts its own field as spaces
    field(156, b"0");
    field(257, b"ustar\0");
    field(263, b"00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());

    let tmp_path = dir.join(format!("partial-{}", rng.next_u64()));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp_path)?);
    file.write_all(&header)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    let padding = (512 - size % 512) % 512;
    // The file's padding, then the two zero blocks that end the archive.
    file.write_all(&vec![0u8; padding as usize + 1024])?;
    file.flush()?;
    drop(file);
    let digest = digest_of_file(&tmp_path)?;
    let path = dir.join(digest_hex(&digest));
    std::fs::rename(&tmp_path, &path)?;
    let total = 512 + size + padding + 1024;
    Ok(Blob { digest, size: total, media_type: OCI_LAYER.to_string(), path })
}
