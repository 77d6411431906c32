//! `shoal-agent containerd-config`: point containerd at the node-local agent, and undo it.
//!
//! containerd (1.5 and later, including 2.x) reads one `hosts.toml` per registry from its
//! registry `config_path`, conventionally `/etc/containerd/certs.d/<registry>/hosts.toml`.
//! Changes there take effect on the next pull without restarting containerd. For each
//! registry this command writes:
//!
//! ```toml
//! # managed by shoal-agent containerd-config
//! server = "https://registry-1.docker.io"
//!
//! [host."http://127.0.0.1:5000"]
//!   capabilities = ["pull", "resolve"]
//! ```
//!
//! - The `[host]` entry is tried first. containerd appends `?ns=<registry>` to every request it
//!   sends to a host that is not the registry itself, which is how the agent learns the origin.
//! - An `http://` host is spoken to in plain HTTP by containerd 1.6, 1.7 and 2.x: the scheme in
//!   the table key decides, and nothing else is needed (`skip_verify` is about TLS only).
//! - `resolve` lets the agent answer tag lookups; it asks the origin itself, so that is safe.
//!   `push` is left out: pushes go straight to the origin.
//! - `server` is the fallback once every host failed: if the agent is down (connection refused
//!   on loopback is immediate), pulls still work, straight from the origin.
//!
//! Rules that keep the command safe to run from an init container on every pod start:
//!
//! - The first line is [`MARKER`]; only such files count as ours.
//! - A file that is ours and already has the wanted bytes is not touched at all (same inode,
//!   same mtime), so running twice changes nothing.
//! - A file that is not ours is never overwritten without `--force`. With `--force` it is first
//!   kept as `hosts.toml.shoal-backup` (a hard link: the same bytes, mode and mtime), and only
//!   once: if a backup already exists and the file is foreign again, the command refuses rather
//!   than lose either file.
//! - Every registry is checked before anything is written, so a refusal leaves no partial change.
//! - Writes are atomic: a temporary file in the same directory, fsync, rename, fsync of the
//!   directory.
//! - `--restore` puts a backup back by renaming it (byte for byte), or else removes our file and
//!   the registry directory if we created it and it is now empty (recorded in our file itself by
//!   [`CREATED_DIR_LINE`], so no state lives anywhere else).
//!
//! Only `std` touches the file system here: this module runs before the agent starts (init
//! container) or after it stopped (preStop hook), and has nothing to do with the content store.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// First line of every `hosts.toml` this command writes.
pub const MARKER: &str = "# managed by shoal-agent containerd-config";

/// Written into our file when this command created the registry directory, so that
/// `--restore` knows it may remove that directory again.
pub const CREATED_DIR_LINE: &str =
    "# shoal: this directory was created by shoal-agent; --restore removes it when empty";

/// File name containerd reads in each registry directory.
pub const HOSTS_FILE: &str = "hosts.toml";

/// Where a foreign `hosts.toml` is kept while ours replaces it (`--force`).
pub const BACKUP_FILE: &str = "hosts.toml.shoal-backup";

/// containerd's catch-all namespace, used for registries with no directory of their own.
const DEFAULT_NAMESPACE: &str = "_default";

/// Arguments of `shoal-agent containerd-config`.
#[derive(clap::Args, Debug, Clone)]
pub struct ContainerdConfigArgs {
    /// containerd's registry `config_path`: one `<registry>/hosts.toml` is written under it.
    #[arg(long, env = "SHOAL_HOSTS_DIR", default_value = "/etc/containerd/certs.d")]
    pub hosts_dir: PathBuf,

    /// Registries (host[:port], or `_default`) to send through the mirror, comma-separated.
    #[arg(
        long,
        env = "SHOAL_REGISTRIES",
        value_delimiter = ',',
        default_value = "docker.io,ghcr.io,quay.io,registry.k8s.io"
    )]
    pub registries: Vec<String>,

    /// The agent's registry API as containerd on this node reaches it (http:// or https://).
    #[arg(long, env = "SHOAL_MIRROR", default_value = "http://127.0.0.1:5000")]
    pub mirror: String,

    /// Undo: put back each backed-up hosts.toml, or remove the ones this command wrote.
    #[arg(long, env = "SHOAL_RESTORE")]
    pub restore: bool,

    /// Replace a hosts.toml this command did not write (it is kept as hosts.toml.shoal-backup).
    #[arg(long, env = "SHOAL_FORCE")]
    pub force: bool,
}

/// Why `containerd-config` failed. Nothing was changed when a validation or refusal variant is
/// returned; an [`Io`](ContainerdConfigError::Io) error may leave earlier registries done.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    /// `--registries` was empty.
    #[error("no registries given")]
    NoRegistries,

    /// A registry name is not a `host[:port]` (or `_default`).
    #[error("invalid registry name {name:?}: {reason}")]
    InvalidRegistry { name: String, reason: &'static str },

    /// The mirror is not an `http://` or `https://` URL of a host.
    #[error("invalid mirror URL {url:?}: {reason}")]
    InvalidMirror { url: String, reason: &'static str },

    /// A `hosts.toml` that this command did not write is in the way, and `--force` was not given.
    #[error(
        "{} was not written by shoal-agent; refusing to replace it (rerun with --force to keep it as {} and replace it)",
        .path.display(),
        .backup.display()
    )]
    ForeignFile { path: PathBuf, backup: PathBuf },

    /// A foreign `hosts.toml` is in the way and a backup already exists: replacing or restoring
    /// would lose one of the two files, even with `--force`.
    #[error(
        "{} was not written by shoal-agent and {} already exists; refusing to lose either, move one of them away",
        .path.display(),
        .backup.display()
    )]
    BackupExists { path: PathBuf, backup: PathBuf },

    /// A file system operation failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T, E = ContainerdConfigError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ContainerdConfigError {
    let path = path.to_path_buf();
    move |source| ContainerdConfigError::Io { op, path, source }
}

/// What happened to one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No hosts.toml was there; ours was written.
    Written,
    /// Ours was there with other content (e.g. another mirror); it was rewritten.
    Updated,
    /// Ours was there with the wanted content; nothing was touched.
    Unchanged,
    /// A foreign hosts.toml was kept as the backup, and ours was written (`--force`).
    BackedUpAndWritten { backup: PathBuf },
    /// The backup was moved back into place (`--restore`).
    Restored { backup: PathBuf },
    /// Ours was removed, and the registry directory too when `dir_removed` (`--restore`).
    Removed { dir_removed: bool },
    /// A hosts.toml that is not ours and has no backup of ours: left alone (`--restore`).
    NotOurs,
    /// Neither ours nor a backup was there (`--restore`).
    NothingToRestore,
}

/// One registry's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub registry: String,
    /// The registry's `hosts.toml`.
    pub path: PathBuf,
    pub outcome: Outcome,
}

/// What [`run`] did, one entry per registry in the order given. Displayed as one line per
/// registry, each ending in a newline (`print!("{summary}")`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: Vec<Entry>,
}

impl Summary {
    /// Whether any file was written, moved or removed.
    pub fn changed(&self) -> bool {
        self.entries
            .iter()
            .any(|e| !matches!(e.outcome, Outcome::Unchanged | Outcome::NotOurs | Outcome::NothingToRestore))
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            let path = e.path.display();
            write!(f, "{}: ", e.registry)?;
            match &e.outcome {
                Outcome::Written => write!(f, "written {path}")?,
                Outcome::Updated => write!(f, "updated {path}")?,
                Outcome::Unchanged => write!(f, "unchanged {path}")?,
                Outcome::BackedUpAndWritten { backup } => {
                    write!(f, "backed up {path} to {} and written", backup.display())?
                }
                Outcome::Restored { backup } => write!(f, "restored {path} from {}", backup.display())?,
                Outcome::Removed { dir_removed: false } => write!(f, "removed {path}")?,
                Outcome::Removed { dir_removed: true } => write!(f, "removed {path} and its directory")?,
                Outcome::NotOurs => write!(f, "left {path} alone (not written by shoal-agent)")?,
                Outcome::NothingToRestore => write!(f, "nothing to restore at {path}")?,
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Runs `containerd-config`: writes (or, with `--restore`, undoes) one `hosts.toml` per registry.
pub fn run(args: &ContainerdConfigArgs) -> Result<Summary> {
    let registries = registries(&args.registries)?;
    if args.restore {
        // The mirror is not needed to undo, and a bad one must not block undoing.
        restore(&args.hosts_dir, &registries, args.force)
    } else {
        let mirror = validate_mirror(&args.mirror)?;
        write(&args.hosts_dir, &registries, &mirror, args.force)
    }
}

/// The `hosts.toml` this command writes for `registry`, sending pulls to `mirror` first.
pub fn hosts_toml(registry: &str, mirror: &str) -> Result<String> {
    validate_registry(registry)?;
    Ok(render(registry, &validate_mirror(mirror)?, false))
}

/// The origin containerd falls back to for `registry`; `None` for `_default`, where containerd
/// falls back to the registry named in the image reference.
pub fn origin_url(registry: &str) -> Option<String> {
    match registry {
        DEFAULT_NAMESPACE => None,
        // containerd's own default for docker.io: the API is not served on docker.io itself.
        "docker.io" => Some("https://registry-1.docker.io".to_owned()),
        other => Some(format!("https://{other}")),
    }
}

fn render(registry: &str, mirror: &str, created_dir: bool) -> String {
    let mut s = String::new();
    s.push_str(MARKER);
    s.push('\n');
    s.push_str("# Pulls go to the node-local Shoal agent first, and to the origin if it fails.\n");
    s.push_str("# Undo with `shoal-agent containerd-config --restore`; edits here may be overwritten.\n");
    if created_dir {
        s.push_str(CREATED_DIR_LINE);
        s.push('\n');
    }
    if let Some(origin) = origin_url(registry) {
        s.push_str(&format!("server = \"{origin}\"\n"));
    }
    s.push_str(&format!("\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"));
    s
}

fn is_ours(content: &[u8]) -> bool {
    let first = content.split(|&b| b == b'\n').next().unwrap_or_default();
    first.strip_suffix(b"\r").unwrap_or(first) == MARKER.as_bytes()
}

fn records_created_dir(content: &[u8]) -> bool {
    content
        .split(|&b| b == b'\n')
        .any(|line| line.strip_suffix(b"\r").unwrap_or(line) == CREATED_DIR_LINE.as_bytes())
}

fn registries(given: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for name in given.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        validate_registry(name)?;
        if !out.iter().any(|r| r == name) {
            out.push(name.to_owned());
        }
    }
    if out.is_empty() {
        return Err(ContainerdConfigError::NoRegistries);
    }
    Ok(out)
}

/// A registry becomes a directory name, so it must be a plain `host[:port]`: no separators, no
/// `..`, nothing containerd would not look up.
fn validate_registry(name: &str) -> Result<()> {
    let invalid = |reason| Err(ContainerdConfigError::InvalidRegistry { name: name.to_owned(), reason });
    if name == DEFAULT_NAMESPACE {
        return Ok(());
    }
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > 260 {
        return invalid("too long");
    }
    if name.contains('/') || name.contains('\\') {
        return invalid("must be host[:port], without a scheme or a path");
    }
    if name.contains("..") {
        return invalid("must not contain '..'");
    }
    let (host, port) = match name.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (name, None),
    };
    if let Some(port) = port {
        if !valid_port(port) {
            return invalid("port must be a number from 1 to 65535 (IPv6 addresses are not supported)");
        }
    }
    if !valid_hostname(host) {
        return invalid("host must be dot-separated labels of letters, digits and '-'");
    }
    Ok(())
}

fn valid_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && matches!(port.parse::<u32>(), Ok(1..=65535))
}

/// Checks the mirror URL and returns it without a trailing `/`, as it goes into the TOML key.
fn validate_mirror(url: &str) -> Result<String> {
    let invalid = |reason| Err(ContainerdConfigError::InvalidMirror { url: url.to_owned(), reason });
    let rest = match url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) {
        Some(rest) => rest,
        None => return invalid("must start with http:// or https://"),
    };
    // It is written into a TOML string: allow nothing that would need escaping.
    if url.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\') {
        return invalid("must not contain whitespace, quotes or backslashes");
    }
    if url.contains('?') || url.contains('#') {
        return invalid("must not have a query or a fragment");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return invalid("must not contain credentials");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((addr, after)) => {
                if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
                    return invalid("bad IPv6 address");
                }
                match after {
                    "" => (addr, None),
                    _ => match after.strip_prefix(':') {
                        Some(port) => (addr, Some(port)),
                        None => return invalid("bad port"),
                    },
                }
            }
            None => return invalid("unclosed '[' in host"),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => {
                if !valid_hostname(host) {
                    return invalid("bad host");
                }
                (host, Some(port))
            }
            None => {
                if !valid_hostname(authority) {
                    return invalid("bad host");
                }
                (authority, None)
            }
        }
    };
    if host.is_empty() {
        return invalid("no host");
    }
    if let Some(port) = port {
        if !valid_port(port) {
            return invalid("port must be a number from 1 to 65535");
        }
    }
    if path.split('/').any(|seg| seg == "..") {
        return invalid("path must not contain '..'");
    }
    Ok(url.trim_end_matches('/').to_owned())
}

struct Paths {
    dir: PathBuf,
    file: PathBuf,
    backup: PathBuf,
}

impl Paths {
    fn new(hosts_dir: &Path, registry: &str) -> Self {
        let dir = hosts_dir.join(registry);
        Paths { file: dir.join(HOSTS_FILE), backup: dir.join(BACKUP_FILE), dir }
    }
}

/// Reads a file, `None` if it does not exist.
fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Whether a path exists, without following a final symlink.
fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

enum Current {
    Absent,
    Ours(Vec<u8>),
    Foreign,
}

fn current(paths: &Paths) -> Result<Current> {
    Ok(match read_opt(&paths.file)? {
        None => Current::Absent,
        Some(bytes) if is_ours(&bytes) => Current::Ours(bytes),
        Some(_) => Current::Foreign,
    })
}

fn write(hosts_dir: &Path, registries: &[String], mirror: &str, force: bool) -> Result<Summary> {
    // Check every registry first, so that a refusal changes nothing.
    let mut plan = Vec::with_capacity(registries.len());
    for registry in registries {
        let paths = Paths::new(hosts_dir, registry);
        let current = current(&paths)?;
        if let Current::Foreign = current {
            if exists(&paths.backup)? {
                return Err(ContainerdConfigError::BackupExists { path: paths.file, backup: paths.backup });
            }
            if !force {
                return Err(ContainerdConfigError::ForeignFile { path: paths.file, backup: paths.backup });
            }
        }
        plan.push((registry, paths, current));
    }

    if !exists(hosts_dir)? {
        tracing::info!(dir = %hosts_dir.display(), "creating the containerd hosts directory; containerd reads it only if its registry config_path points here");
        fs::create_dir_all(hosts_dir).map_err(io_err("create directory", hosts_dir))?;
    }

    let mut summary = Summary::default();
    for (registry, paths, current) in plan {
        warn_if_shadowed(hosts_dir, registry);
        let outcome = match current {
            Current::Ours(bytes) => {
                let wanted = render(registry, mirror, records_created_dir(&bytes));
                if bytes == wanted.as_bytes() {
                    Outcome::Unchanged
                } else {
                    write_atomic(&paths.dir, &paths.file, wanted.as_bytes())?;
                    Outcome::Updated
                }
            }
            Current::Absent => {
                let created_dir = match fs::create_dir(&paths.dir) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                    Err(e) => return Err(io_err("create directory", &paths.dir)(e)),
                };
                let wanted = render(registry, mirror, created_dir);
                write_atomic(&paths.dir, &paths.file, wanted.as_bytes())?;
                Outcome::Written
            }
            Current::Foreign => {
                // A hard link keeps the very same file (bytes, mode, mtime) under the backup
                // name, and fails if a backup appeared meanwhile; hosts.toml never goes missing.
                fs::hard_link(&paths.file, &paths.backup).map_err(io_err("back up to", &paths.backup))?;
                sync_dir(&paths.dir)?;
                let wanted = render(registry, mirror, false);
                write_atomic(&paths.dir, &paths.file, wanted.as_bytes())?;
                Outcome::BackedUpAndWritten { backup: paths.backup.clone() }
            }
        };
        log(registry, &paths.file, &outcome);
        summary.entries.push(Entry { registry: registry.clone(), path: paths.file, outcome });
    }
    Ok(summary)
}

fn restore(hosts_dir: &Path, registries: &[String], force: bool) -> Result<Summary> {
    let mut plan = Vec::with_capacity(registries.len());
    for registry in registries {
        let paths = Paths::new(hosts_dir, registry);
        let current = current(&paths)?;
        let has_backup = exists(&paths.backup)?;
        // Someone replaced our file after we took a backup: restoring would lose their file.
        if has_backup && matches!(current, Current::Foreign) && !force {
            return Err(ContainerdConfigError::BackupExists { path: paths.file, backup: paths.backup });
        }
        plan.push((registry, paths, current, has_backup));
    }

    let mut summary = Summary::default();
    for (registry, paths, current, has_backup) in plan {
        let outcome = if has_backup {
            fs::rename(&paths.backup, &paths.file).map_err(io_err("restore", &paths.file))?;
            sync_dir(&paths.dir)?;
            Outcome::Restored { backup: paths.backup.clone() }
        } else {
            match current {
                Current::Ours(bytes) => {
                    fs::remove_file(&paths.file).map_err(io_err("remove", &paths.file))?;
                    sync_dir(&paths.dir)?;
                    let dir_removed = records_created_dir(&bytes) && remove_dir_if_empty(&paths.dir)?;
                    if dir_removed {
                        sync_dir(hosts_dir)?;
                    }
                    Outcome::Removed { dir_removed }
                }
                Current::Foreign => Outcome::NotOurs,
                Current::Absent => Outcome::NothingToRestore,
            }
        };
        log(registry, &paths.file, &outcome);
        summary.entries.push(Entry { registry: registry.clone(), path: paths.file, outcome });
    }
    Ok(summary)
}

fn log(registry: &str, path: &Path, outcome: &Outcome) {
    tracing::debug!(registry, path = %path.display(), outcome = ?outcome, "containerd-config");
}

/// containerd looks up `host_port_` before `host:port`; a hosts.toml there would win over ours.
fn warn_if_shadowed(hosts_dir: &Path, registry: &str) {
    if let Some((host, port)) = registry.rsplit_once(':') {
        let shadow = hosts_dir.join(format!("{host}_{port}_")).join(HOSTS_FILE);
        if shadow.exists() {
            tracing::warn!(
                path = %shadow.display(),
                "containerd reads this file instead of the one written for {registry}"
            );
        }
    }
}

fn remove_dir_if_empty(dir: &Path) -> Result<bool> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        // Not empty (ENOTEMPTY, or EEXIST on some systems): someone else's files live there.
        Err(_) if fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false) => Ok(false),
        Err(e) => Err(io_err("remove directory", dir)(e)),
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` so that readers see the old or the new file, never a part.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".shoal-tmp-{}-{}", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
    let tmp = dir.join(name);
    let result = (|| {
        let mut file =
            fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err("create", &tmp))?;
        set_readable(&file, &tmp)?;
        file.write_all(bytes).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(dir)
}

/// containerd runs as root, but an unprivileged `ctr --hosts-dir` user should read it too,
/// whatever the umask.
#[cfg(unix)]
fn set_readable(file: &fs::File, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o644)).map_err(io_err("set permissions of", path))
}

#[cfg(not(unix))]
fn set_readable(_file: &fs::File, _path: &Path) -> Result<()> {
    Ok(())
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    const MIRROR: &str = "http://127.0.0.1:5000";

    fn args(dir: &Path, registries: &[&str]) -> ContainerdConfigArgs {
        ContainerdConfigArgs {
            hosts_dir: dir.to_path_buf(),
            registries: registries.iter().map(|r| r.to_string()).collect(),
            mirror: MIRROR.to_owned(),
            restore: false,
            force: false,
        }
    }

    fn restore_args(dir: &Path, registries: &[&str]) -> ContainerdConfigArgs {
        ContainerdConfigArgs { restore: true, ..args(dir, registries) }
    }

    /// Every file and directory under `root` with its content (None for directories) and mtime.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (Option<Vec<u8>>, SystemTime)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let content = if meta.is_dir() {
                    stack.push(path.clone());
                    None
                } else {
                    Some(fs::read(&path).unwrap())
                };
                out.insert(path, (content, meta.modified().unwrap()));
            }
        }
        out
    }

    fn outcomes(summary: &Summary) -> Vec<Outcome> {
        summary.entries.iter().map(|e| e.outcome.clone()).collect()
    }

    #[test]
    fn fresh_write() {
        let tmp = tempfile::tempdir().unwrap();
        let hosts = tmp.path().join("certs.d"); // does not exist yet
        let summary = run(&args(&hosts, &["docker.io", "ghcr.io", "localhost:5443"])).unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::Written; 3]);
        assert!(summary.changed());

        let docker = fs::read_to_string(hosts.join("docker.io/hosts.toml")).unwrap();
        assert_eq!(
            docker,
            format!(
                "{MARKER}\n\
                 # Pulls go to the node-local Shoal agent first, and to the origin if it fails.\n\
                 # Undo with `shoal-agent containerd-config --restore`; edits here may be overwritten.\n\
                 {CREATED_DIR_LINE}\n\
                 server = \"https://registry-1.docker.io\"\n\
                 \n\
                 [host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            )
        );
        let ghcr = fs::read_to_string(hosts.join("ghcr.io/hosts.toml")).unwrap();
        assert!(ghcr.starts_with(&format!("{MARKER}\n")));
        assert!(ghcr.contains("server = \"https://ghcr.io\"\n"));
        let port = fs::read_to_string(hosts.join("localhost:5443/hosts.toml")).unwrap();
        assert!(port.contains("server = \"https://localhost:5443\"\n"));

        // Only the three hosts.toml files: no temporary files or backups left behind.
        let files: Vec<_> = snapshot(&hosts)
            .into_iter()
            .filter(|(_, (content, _))| content.is_some())
            .map(|(p, _)| p.strip_prefix(&hosts).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            files,
            ["docker.io/hosts.toml", "ghcr.io/hosts.toml", "localhost:5443/hosts.toml"].map(PathBuf::from)
        );

        let text = summary.to_string();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.starts_with("docker.io: written "), "{text}");
    }

    #[test]
    fn second_run_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let a = args(tmp.path(), &["docker.io", "quay.io"]);
        run(&a).unwrap();
        let before = snapshot(tmp.path());
        // mtime granularity is fine on Linux file systems, but make a rewrite observable anyway.
        std::thread::sleep(std::time::Duration::from_millis(20));

        let summary = run(&a).unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::Unchanged; 2]);
        assert!(!summary.changed());
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn another_mirror_updates_our_file_and_keeps_the_created_dir_record() {
        let tmp = tempfile::tempdir().unwrap();
        run(&args(tmp.path(), &["docker.io"])).unwrap();
        let summary = run(&ContainerdConfigArgs {
            mirror: "https://mirror.example:8443/".into(),
            ..args(tmp.path(), &["docker.io"])
        })
        .unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::Updated]);
        let content = fs::read_to_string(tmp.path().join("docker.io/hosts.toml")).unwrap();
        assert!(content.contains("[host.\"https://mirror.example:8443\"]\n"), "{content}");
        assert!(content.contains(CREATED_DIR_LINE));

        run(&restore_args(tmp.path(), &["docker.io"])).unwrap();
        assert!(!tmp.path().join("docker.io").exists());
    }

    #[test]
    fn refuses_a_foreign_file_without_force_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("quay.io");
        fs::create_dir(&dir).unwrap();
        let foreign = b"server = \"https://quay.io\"\n[host.\"https://other-mirror\"]\n";
        fs::write(dir.join(HOSTS_FILE), foreign).unwrap();
        let before = snapshot(tmp.path());

        // docker.io comes first and is fine: it must not be written either.
        let err = run(&args(tmp.path(), &["docker.io", "quay.io"])).unwrap_err();
        match &err {
            ContainerdConfigError::ForeignFile { path, backup } => {
                assert_eq!(path, &dir.join(HOSTS_FILE));
                assert_eq!(backup, &dir.join(BACKUP_FILE));
            }
            other => panic!("unexpected error: {other}"),
        }
        let message = err.to_string();
        assert!(message.contains("quay.io/hosts.toml") && message.contains("--force"), "{message}");
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn force_backs_up_and_restore_brings_the_file_back_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("docker.io");
        fs::create_dir(&dir).unwrap();
        // Odd bytes on purpose: CRLF, no trailing newline, not even valid UTF-8.
        let foreign: &[u8] =
            b"server = \"https://registry-1.docker.io\"\r\n# \xff\xfe\r\n[host.\"https://x\"]";
        fs::write(dir.join(HOSTS_FILE), foreign).unwrap();
        let foreign_mtime = fs::metadata(dir.join(HOSTS_FILE)).unwrap().modified().unwrap();

        let forced = ContainerdConfigArgs { force: true, ..args(tmp.path(), &["docker.io"]) };
        let summary = run(&forced).unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::BackedUpAndWritten { backup: dir.join(BACKUP_FILE) }]);
        assert_eq!(fs::read(dir.join(BACKUP_FILE)).unwrap(), foreign);
        let ours = fs::read_to_string(dir.join(HOSTS_FILE)).unwrap();
        assert!(ours.starts_with(MARKER));
        // The directory was not ours: --restore must never remove it.
        assert!(!ours.contains(CREATED_DIR_LINE));

        // Running again (with or without --force) neither rewrites nor takes another backup.
        let before = snapshot(tmp.path());
        assert_eq!(outcomes(&run(&forced).unwrap()), vec![Outcome::Unchanged]);
        assert_eq!(outcomes(&run(&args(tmp.path(), &["docker.io"])).unwrap()), vec![Outcome::Unchanged]);
        assert_eq!(snapshot(tmp.path()), before);

        let summary = run(&restore_args(tmp.path(), &["docker.io"])).unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::Restored { backup: dir.join(BACKUP_FILE) }]);
        assert_eq!(fs::read(dir.join(HOSTS_FILE)).unwrap(), foreign);
        assert_eq!(fs::metadata(dir.join(HOSTS_FILE)).unwrap().modified().unwrap(), foreign_mtime);
        assert!(!dir.join(BACKUP_FILE).exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

        // Restoring again: the file is foreign and there is no backup, so it is left alone.
        let summary = run(&restore_args(tmp.path(), &["docker.io"])).unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::NotOurs]);
        assert_eq!(fs::read(dir.join(HOSTS_FILE)).unwrap(), foreign);
    }

    #[test]
    fn never_loses_a_foreign_file_when_a_backup_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ghcr.io");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(HOSTS_FILE), b"# first\n").unwrap();
        let forced = ContainerdConfigArgs { force: true, ..args(tmp.path(), &["ghcr.io"]) };
        run(&forced).unwrap();
        // Node configuration management writes its own file over ours.
        fs::write(dir.join(HOSTS_FILE), b"# second\n").unwrap();

        let err = run(&forced).unwrap_err();
        assert!(matches!(err, ContainerdConfigError::BackupExists { .. }), "{err}");
        let err = run(&restore_args(tmp.path(), &["ghcr.io"])).unwrap_err();
        assert!(matches!(err, ContainerdConfigError::BackupExists { .. }), "{err}");
        assert_eq!(fs::read(dir.join(HOSTS_FILE)).unwrap(), b"# second\n");
        assert_eq!(fs::read(dir.join(BACKUP_FILE)).unwrap(), b"# first\n");
    }

    #[test]
    fn restore_without_backup_removes_ours_and_the_directory_we_created() {
        let tmp = tempfile::tempdir().unwrap();
        // registry.k8s.io's directory exists already (with a CA file): it must stay.
        let k8s = tmp.path().join("registry.k8s.io");
        fs::create_dir(&k8s).unwrap();
        fs::write(k8s.join("ca.crt"), b"cert").unwrap();
        // ghcr.io's directory exists already and is empty: it must stay too.
        fs::create_dir(tmp.path().join("ghcr.io")).unwrap();
        let registries = ["docker.io", "registry.k8s.io", "ghcr.io", "quay.io"];
        run(&args(tmp.path(), &registries)).unwrap();
        // Someone drops a file into quay.io's directory after we created it.
        fs::write(tmp.path().join("quay.io/ca.crt"), b"cert").unwrap();

        let summary = run(&restore_args(tmp.path(), &registries)).unwrap();
        assert_eq!(
            outcomes(&summary),
            vec![
                Outcome::Removed { dir_removed: true },
                Outcome::Removed { dir_removed: false },
                Outcome::Removed { dir_removed: false },
                Outcome::Removed { dir_removed: false },
            ]
        );
        assert!(!tmp.path().join("docker.io").exists());
        assert_eq!(fs::read_dir(&k8s).unwrap().count(), 1);
        assert!(tmp.path().join("ghcr.io").is_dir());
        assert!(!tmp.path().join("quay.io/hosts.toml").exists());
        assert!(tmp.path().join("quay.io/ca.crt").exists());

        // Idempotent: a second restore finds nothing to do.
        let summary = run(&restore_args(tmp.path(), &registries)).unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::NothingToRestore; 4]);
        assert!(!summary.changed());
        assert!(summary.to_string().contains("docker.io: nothing to restore at"));
    }

    #[test]
    fn restore_of_a_missing_hosts_dir_is_a_no_op() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let summary = run(&restore_args(&missing, &["docker.io"])).unwrap();
        assert_eq!(outcomes(&summary), vec![Outcome::NothingToRestore]);
        assert!(!missing.exists());
    }

    #[test]
    fn rejects_bad_registry_names_before_touching_anything() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in [
            "..",
            "../etc",
            "docker.io/library",
            "https://docker.io",
            "a..b",
            ".",
            "-bad.io",
            "bad-.io",
            "host:0",
            "host:65536",
            "host:",
            "host:port",
            "::1",
            "with space",
            "quote\"d",
            "back\\slash",
            "_other",
        ] {
            for restore in [false, true] {
                let a = ContainerdConfigArgs { restore, ..args(tmp.path(), &["docker.io", bad]) };
                match run(&a) {
                    Err(ContainerdConfigError::InvalidRegistry { name, .. }) => {
                        assert_eq!(name, bad)
                    }
                    other => panic!("{bad:?} (restore: {restore}): {other:?}"),
                }
            }
        }
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);

        let err = run(&args(tmp.path(), &[" ", ""])).unwrap_err();
        assert!(matches!(err, ContainerdConfigError::NoRegistries), "{err}");

        for good in ["docker.io", "localhost", "127.0.0.1:5000", "my-registry.example.com:443", "_default"] {
            validate_registry(good).unwrap();
        }
    }

    #[test]
    fn rejects_bad_mirror_urls() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in [
            "127.0.0.1:5000",
            "ftp://127.0.0.1:5000",
            "http://",
            "http://:5000",
            "http://127.0.0.1:0",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:port",
            "http://user:pw@127.0.0.1:5000",
            "http://127.0.0.1:5000?x=1",
            "http://127.0.0.1:5000/#frag",
            "http://127.0.0.1:5000\"]\nserver = \"evil",
            "http://127.0.0.1 :5000",
            "http://[::1",
            "http://host/../x",
            "",
        ] {
            match run(&ContainerdConfigArgs { mirror: bad.into(), ..args(tmp.path(), &["docker.io"]) }) {
                Err(ContainerdConfigError::InvalidMirror { url, .. }) => assert_eq!(url, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);

        for (good, key) in [
            ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
            ("http://127.0.0.1:5000/", "http://127.0.0.1:5000"),
            ("https://mirror.example", "https://mirror.example"),
            ("http://[::1]:5000", "http://[::1]:5000"),
            ("http://node-cache:5000/shoal", "http://node-cache:5000/shoal"),
        ] {
            assert_eq!(validate_mirror(good).unwrap(), key);
        }
        // Undoing never depends on the mirror.
        run(&ContainerdConfigArgs { mirror: "not a url".into(), ..restore_args(tmp.path(), &["docker.io"]) })
            .unwrap();
    }

    #[test]
    fn default_namespace_has_no_server_line() {
        let content = hosts_toml("_default", MIRROR).unwrap();
        assert!(!content.contains("server ="), "{content}");
        assert!(content.contains("[host.\"http://127.0.0.1:5000\"]"));
        assert!(!content.contains(CREATED_DIR_LINE));
    }

    #[test]
    fn marker_must_be_the_first_line() {
        assert!(is_ours(format!("{MARKER}\nserver = \"x\"\n").as_bytes()));
        assert!(is_ours(format!("{MARKER}\r\n").as_bytes()));
        assert!(!is_ours(format!("# hello\n{MARKER}\n").as_bytes()));
        assert!(!is_ours(format!("{MARKER} (edited)\n").as_bytes()));
        assert!(!is_ours(b""));
    }

    #[test]
    fn cli_defaults_and_environment() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            args: ContainerdConfigArgs,
        }
        // Not reading the process environment here: the variables are unset in tests.
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.args.hosts_dir, PathBuf::from("/etc/containerd/certs.d"));
        assert_eq!(cli.args.registries, ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"]);
        assert_eq!(cli.args.mirror, "http://127.0.0.1:5000");
        assert!(!cli.args.restore && !cli.args.force);

        let cli = Cli::try_parse_from([
            "x",
            "--hosts-dir",
            "/host/etc/containerd/certs.d",
            "--registries",
            "docker.io,quay.io",
            "--restore",
            "--force",
        ])
        .unwrap();
        assert_eq!(cli.args.registries, ["docker.io", "quay.io"]);
        assert!(cli.args.restore && cli.args.force);
    }
}
