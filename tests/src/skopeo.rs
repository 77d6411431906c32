//! skopeo as a pull client through a `registries.conf` mirror.
//!
//! skopeo 1.9.3 (Debian 12) does not read `CONTAINERS_REGISTRIES_CONF`; it has a hidden
//! global flag `--registries-conf FILE`, which we use. A mirror `location` is an image
//! reference prefix, so its path part must be a valid repository path component:
//! `127.0.0.1:AGENT/127.0.0.1:ORIGIN` is rejected ("invalid reference format") because of
//! the `:`. Path-prefix tests therefore use a registry *name* without a port (e.g.
//! `origin.shoal.test`) that the agent maps to the origin with `--upstream`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::{run_bounded, CmdOutput};
use crate::util::find_binary;

/// Writes a registries.conf with one registry `prefix`, its primary `location`, and one
/// insecure (plain-HTTP) mirror `mirror_location`.
pub fn write_registries_conf(path: &Path, prefix: &str, location: &str, mirror_location: &str) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "unqualified-search-registries = []\n\n\
             [[registry]]\n\
             prefix = \"{prefix}\"\n\
             location = \"{location}\"\n\
             insecure = true\n\n\
             [[registry.mirror]]\n\
             location = \"{mirror_location}\"\n\
             insecure = true\n"
        ),
    )?;
    Ok(())
}

/// Runs skopeo with `--insecure-policy --registries-conf <conf>`, a private tmpdir and
/// HOME (no auth files), bounded. Non-zero exit is returned, not an error.
pub async fn skopeo(registries_conf: &Path, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
    let binary = find_binary("skopeo", "skopeo")?;
    let tmp = tempfile::Builder::new().prefix("shoal-skopeo-").tempdir()?;
    let mut cmd = Command::new(binary);
    cmd.arg("--insecure-policy")
        .arg("--registries-conf")
        .arg(registries_conf)
        .arg("--tmpdir")
        .arg(tmp.path())
        .args(args)
        .env("HOME", tmp.path());
    run_bounded(cmd, timeout).await
}

/// `skopeo copy --all --preserve-digests --src-no-creds docker://<src> dir:<dest>`.
pub async fn copy_to_dir(registries_conf: &Path, src: &str, dest: &Path) -> Result<CmdOutput> {
    let dest_arg = format!("dir:{}", dest.display());
    let src_arg = format!("docker://{src}");
    skopeo(
        registries_conf,
        &["--debug", "copy", "--all", "--preserve-digests", "--src-no-creds", &src_arg, &dest_arg],
        Duration::from_secs(120),
    )
    .await
}

/// What a skopeo `dir:` destination holds.
#[derive(Debug)]
pub struct DirImage {
    /// `manifest.json` (the top-level manifest) bytes.
    pub manifest: Vec<u8>,
    /// Every other file by name (`<hex>`, `<hex>.manifest.json`, `version`, ...).
    pub files: BTreeMap<String, PathBuf>,
}

pub fn read_dir_image(dir: &Path) -> Result<DirImage> {
    let manifest = std::fs::read(dir.join("manifest.json"))
        .with_context(|| format!("{}/manifest.json", dir.display()))?;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str() {
            if name != "manifest.json" {
                files.insert(name.to_string(), entry.path());
            }
        }
    }
    Ok(DirImage { manifest, files })
}
