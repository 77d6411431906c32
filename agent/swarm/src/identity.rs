//! The node's persistent identity and the cluster's pre-shared key, read from files.
//!
//! The node key is an ed25519 key in libp2p's protobuf encoding (the format of
//! `Keypair::to_protobuf_encoding`, also used by other libp2p implementations). It is created
//! on first start with mode 0600 and reused after, so a restarted agent keeps its PeerId and
//! the provider records other nodes hold for it stay valid. Creation is atomic: the key is
//! written and fsynced under a temporary name and then hard-linked into place, which fails if
//! another process got there first; that process's key is then used.
//!
//! These are small files read once at start, before the event loop runs; nothing here runs
//! on the loop.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p::identity::Keypair;
use libp2p::pnet::{KeyParseError, PreSharedKey};

use super::SwarmError;

fn key_error(path: &Path, reason: impl std::fmt::Display) -> SwarmError {
    SwarmError::KeyFile { path: path.to_path_buf(), reason: reason.to_string() }
}

/// Reads the node key at `path`, creating it if the file does not exist.
pub(crate) fn load_or_create_keypair(path: &Path) -> Result<Keypair, SwarmError> {
    match read_keypair(path)? {
        Some(keypair) => Ok(keypair),
        None => create_keypair(path),
    }
}

/// The key at `path`, `None` if there is no such file.
fn read_keypair(path: &Path) -> Result<Option<Keypair>, SwarmError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(key_error(path, format!("cannot read: {e}"))),
    };
    let keypair = Keypair::from_protobuf_encoding(&bytes)
        .map_err(|e| key_error(path, format!("not a libp2p private key in protobuf encoding ({e})")))?;
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "node key file is readable by others; it should be 0600");
        }
    }
    Ok(Some(keypair))
}

fn create_keypair(path: &Path) -> Result<Keypair, SwarmError> {
    let keypair = Keypair::generate_ed25519();
    let bytes =
        keypair.to_protobuf_encoding().map_err(|e| key_error(path, format!("cannot encode key: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| key_error(path, format!("cannot create directory: {e}")))?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = Path::new(&tmp_name);
    let _ = fs::remove_file(tmp); // a leftover of a crashed start with the same pid
    let written = (|| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::hard_link(tmp, path)
    })();
    let _ = fs::remove_file(tmp);
    match written {
        Ok(()) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(dir) = fs::File::open(dir) {
                    let _ = dir.sync_all();
                }
            }
            tracing::info!(path = %path.display(), peer_id = %keypair.public().to_peer_id(), "created node key");
            Ok(keypair)
        }
        // Another process created the key between our read and our link: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_keypair(path)?.ok_or_else(|| key_error(path, "disappeared while being created"))
        }
        Err(e) => Err(key_error(path, format!("cannot write: {e}"))),
    }
}

/// Reads a pnet pre-shared key file: `/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits.
pub(crate) fn load_swarm_key(path: &Path) -> Result<PreSharedKey, SwarmError> {
    let error = |reason: String| SwarmError::SwarmKey { path: path.to_path_buf(), reason };
    let text = fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let key: PreSharedKey = text.parse().map_err(|e| {
        let what = match e {
            KeyParseError::InvalidKeyFile => "not three lines".to_string(),
            KeyParseError::InvalidKeyType => "first line is not /key/swarm/psk/1.0.0/".to_string(),
            KeyParseError::InvalidKeyEncoding => "second line is not /base16/".to_string(),
            KeyParseError::InvalidKeyLength => "the key is not 64 hex digits".to_string(),
            KeyParseError::InvalidKeyChar(e) => format!("the key is not hex ({e})"),
        };
        error(format!(
            "{what}; expected \"/key/swarm/psk/1.0.0/\", \"/base16/\" and 64 hex digits on three lines"
        ))
    })?;
    tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(), "private swarm: pre-shared key loaded");
    Ok(key)
}
