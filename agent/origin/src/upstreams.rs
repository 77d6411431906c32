//! Where each registry's origin is: built-in defaults overridden by `--upstream REGISTRY=URL`
//! (a flag of both the agent and the tracker).

use std::collections::BTreeMap;

use shoal_protocol::types::{ParseError, Registry};

/// A bad `--upstream` value.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("--upstream {0:?}: expected REGISTRY=URL, e.g. docker.io=https://registry-1.docker.io")]
    Syntax(String),
    #[error("--upstream {0:?}: the URL must start with http:// or https:// and name a host")]
    Url(String),
    #[error("--upstream: {0}")]
    Registry(ParseError),
}

/// Where each registry's origin is: built-in defaults overridden by `--upstream`.
#[derive(Debug, Clone)]
pub struct Upstreams(BTreeMap<Registry, String>);

/// Registries whose API host differs from their name, or that users expect to work with no
/// configuration.
pub fn default_upstreams() -> [(&'static str, &'static str); 4] {
    [
        ("docker.io", "https://registry-1.docker.io"),
        ("ghcr.io", "https://ghcr.io"),
        ("quay.io", "https://quay.io"),
        ("registry.k8s.io", "https://registry.k8s.io"),
    ]
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams(
            default_upstreams()
                .into_iter()
                .map(|(r, u)| (r.parse().expect("built-in registry names are valid"), u.to_string()))
                .collect(),
        )
    }
}

impl Upstreams {
    /// Adds (or replaces) one `REGISTRY=URL` mapping, as `--upstream` gives it.
    pub fn insert_spec(&mut self, spec: &str) -> Result<Registry, UpstreamError> {
        let (registry, url) = spec.split_once('=').ok_or_else(|| UpstreamError::Syntax(spec.to_string()))?;
        let registry: Registry = registry.trim().parse().map_err(UpstreamError::Registry)?;
        let url = url.trim().trim_end_matches('/');
        let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
        match host {
            Some(h) if !h.is_empty() && !h.contains('/') => {}
            _ => return Err(UpstreamError::Url(spec.to_string())),
        }
        self.0.insert(registry.clone(), url.to_string());
        Ok(registry)
    }

    /// The registries with a known origin.
    pub fn registries(&self) -> impl Iterator<Item = &Registry> {
        self.0.keys()
    }

    /// The base URL (scheme and authority, no trailing slash) of a registry's origin.
    pub fn url(&self, registry: &Registry) -> String {
        self.0.get(registry).cloned().unwrap_or_else(|| format!("https://{registry}"))
    }
}
