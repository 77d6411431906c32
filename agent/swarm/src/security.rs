//! The security protocols of TCP connections: TLS 1.3 (`/tls/1.0.0`) and noise (`/noise`).
//!
//! Both authenticate a peer by its libp2p key (the peer id is checked in the handshake) and
//! encrypt every byte. On native targets both end up in the same primitive: libp2p-noise
//! builds snow with its ring resolver, and libp2p-tls offers TLS_CHACHA20_POLY1305 first, so
//! either way ring's AVX2 ChaCha20-Poly1305 seals the bytes; measured per byte they cost the
//! same (benches/README.md, `peer-path`). TLS is here because it is the other libp2p
//! standard (and the one QUIC uses), so a cluster can move to it without a flag day.
//!
//! A node offers every protocol of its list, in order: a dialer proposes them one after the
//! other (multistream-select) and a listener accepts any of them, so a node that prefers TLS
//! still talks to an older node that speaks only noise. This is what lets a cluster change its
//! preference one node at a time.

use std::fmt;
use std::io;
use std::str::FromStr;

use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::futures::future::{BoxFuture, Either};
use libp2p::futures::{AsyncRead, AsyncWrite, FutureExt, TryFutureExt};
use libp2p::identity::Keypair;
use libp2p::{noise, tls, PeerId};

use super::SwarmError;

/// A security protocol for TCP connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// TLS 1.3 through rustls (libp2p-tls).
    Tls,
    /// The noise XX handshake with ChaCha20-Poly1305 (libp2p-noise).
    Noise,
}

impl Security {
    /// What a node offers unless told otherwise, the first preferred.
    /// Noise first: TLS measured no cheaper on the peer path (benches/README.md, `peer-path`),
    /// and noise-first keeps what existing nodes negotiate with each other.
    pub const DEFAULT: [Security; 2] = [Security::Noise, Security::Tls];

    fn protocol(self) -> &'static str {
        match self {
            Security::Tls => "/tls/1.0.0",
            Security::Noise => "/noise",
        }
    }

    /// Parses a comma-separated list such as `tls,noise`.
    pub fn parse_list(s: &str) -> Result<Vec<Security>, SwarmError> {
        let mut list = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let security: Security = part.parse()?;
            if !list.contains(&security) {
                list.push(security);
            }
        }
        if list.is_empty() {
            return Err(SwarmError::Config(format!("{s:?}: no security protocol (tls, noise)")));
        }
        Ok(list)
    }
}

impl FromStr for Security {
    type Err = SwarmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tls" => Ok(Security::Tls),
            "noise" => Ok(Security::Noise),
            other => Err(SwarmError::Config(format!("unknown security protocol {other:?} (tls, noise)"))),
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::Tls => "tls",
            Security::Noise => "noise",
        })
    }
}

/// The connection upgrade offering a node's security protocols.
#[derive(Clone)]
pub(crate) struct Upgrade {
    order: Vec<Security>,
    tls: tls::Config,
    noise: noise::Config,
}

impl Upgrade {
    pub(crate) fn new(keypair: &Keypair, order: &[Security]) -> Result<Self, SwarmError> {
        Ok(Upgrade {
            order: order.to_vec(),
            tls: tls::Config::new(keypair).map_err(|e| SwarmError::Config(format!("tls: {e}")))?,
            noise: noise::Config::new(keypair).map_err(|e| SwarmError::Config(format!("noise: {e}")))?,
        })
    }
}

impl UpgradeInfo for Upgrade {
    type Info = &'static str;
    type InfoIter = Vec<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.order.iter().map(|s| s.protocol()).collect()
    }
}

/// The encrypted stream: TLS or noise.
pub(crate) type Secured<C> = Either<tls::TlsStream<C>, noise::Output<C>>;

impl<C> InboundConnectionUpgrade<C> for Upgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = io::Error;
    type Future = BoxFuture<'static, Result<Self::Output, io::Error>>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        if info == Security::Tls.protocol() {
            self.tls
                .upgrade_inbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Left(s)))
                .map_err(io::Error::other)
                .boxed()
        } else {
            self.noise
                .upgrade_inbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Right(s)))
                .map_err(io::Error::other)
                .boxed()
        }
    }
}

impl<C> OutboundConnectionUpgrade<C> for Upgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = io::Error;
    type Future = BoxFuture<'static, Result<Self::Output, io::Error>>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        if info == Security::Tls.protocol() {
            self.tls
                .upgrade_outbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Left(s)))
                .map_err(io::Error::other)
                .boxed()
        } else {
            self.noise
                .upgrade_outbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Right(s)))
                .map_err(io::Error::other)
                .boxed()
        }
    }
}
