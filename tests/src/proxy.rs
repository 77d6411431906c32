//! A faulty HTTP/1.1 TCP proxy between the agent and the origin.
//!
//! It forwards one request per connection: the request's `Connection` header is replaced
//! by `Connection: close`, so the origin closes after one response and the client opens a
//! new connection for the next request. That keeps the proxy free of HTTP framing logic:
//! everything after the response header terminator (`\r\n\r\n`) is the body.
//!
//! Faults, applied only to requests whose path contains [`ProxyConfig::path_contains`]
//! (if set), read when a connection is accepted (so a change affects new requests only):
//! - `bytes_per_sec` / `total_bytes_per_sec`: responses (headers and body) are paced to
//!   this rate per connection / across all connections, so a blob is observably "still
//!   downloading" however many Range requests the client spreads it over;
//! - `corrupt_body_offset`: the body byte at this offset is flipped (`^ 0xff`) — an origin
//!   that lies about content.
//!
//! Bounded: at most 256 connections at once, each at most 10 minutes; stopping or dropping
//! the proxy aborts every connection task.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Faults to inject (default: none, a transparent proxy).
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Pace responses to this many bytes per second per connection.
    pub bytes_per_sec: Option<u64>,
    /// Pace all matching responses together to this many bytes per second (shared by all
    /// connections; independent of how many connections the client opens in parallel).
    pub total_bytes_per_sec: Option<u64>,
    /// Flip the response body byte at this offset.
    pub corrupt_body_offset: Option<u64>,
    /// Apply faults only to requests whose path contains this (e.g. `"/blobs/"`).
    pub path_contains: Option<String>,
    /// Apply faults only to requests with this method (e.g. `"GET"`).
    pub method: Option<String>,
}

/// One request that went through the proxy.
#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    pub method: String,
    pub path: String,
    /// Whether a fault was configured and its filters matched this request.
    pub faulty: bool,
    /// Whether a body byte was actually flipped.
    pub corrupted: bool,
    /// Response bytes sent to the client (headers included); set when the exchange ends.
    pub response_bytes: u64,
    /// When the request arrived.
    pub started: Instant,
    /// When the exchange ended (the origin closed); `None` while in flight.
    pub finished: Option<Instant>,
}

struct Shared {
    upstream: SocketAddr,
    config: Mutex<ProxyConfig>,
    log: Mutex<Vec<ProxiedRequest>>,
    /// Shared pacer for `total_bytes_per_sec`: when pacing started, bytes sent since.
    pacer: Mutex<(Option<Instant>, u64)>,
}

impl Shared {
    /// Accounts `n` bytes against the shared rate; returns how long to wait before sending.
    fn shared_delay(&self, rate: u64, n: u64) -> Duration {
        let mut p = self.pacer.lock().unwrap_or_else(|e| e.into_inner());
        let start = *p.0.get_or_insert_with(Instant::now);
        p.1 += n;
        let due = start + Duration::from_secs_f64(p.1 as f64 / rate.max(1) as f64);
        due.saturating_duration_since(Instant::now())
    }
}

/// A running proxy on 127.0.0.1; stopped on drop.
pub struct FaultyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

const MAX_CONNECTIONS: usize = 256;
const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
const MAX_HEAD: usize = 64 * 1024;

impl FaultyProxy {
    /// A proxy in front of `origin` (see [`FaultyProxy::start`]).
    pub async fn in_front_of(origin: &crate::Origin, config: ProxyConfig) -> Result<FaultyProxy> {
        FaultyProxy::start(SocketAddr::from(([127, 0, 0, 1], origin.port())), config).await
    }

    /// Listens on a free loopback port and forwards to `upstream` (e.g. the origin).
    /// Must be called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr, config: ProxyConfig) -> Result<FaultyProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            config: Mutex::new(config),
            log: Mutex::new(Vec::new()),
            pacer: Mutex::new((None, 0)),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultyProxy { addr, shared, task: Some(task) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the fault configuration for connections accepted from now on (and resets
    /// the shared pacer).
    pub fn set_config(&self, config: ProxyConfig) {
        *self.shared.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
        *self.shared.pacer.lock().unwrap_or_else(|e| e.into_inner()) = (None, 0);
    }

    pub fn config(&self) -> ProxyConfig {
        self.shared.config.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.shared.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The GET requests seen so far whose path contains `path`.
    pub fn gets(&self, path: &str) -> Vec<ProxiedRequest> {
        self.requests().into_iter().filter(|r| r.method == "GET" && r.path.contains(path)).collect()
    }

    /// [`FaultyProxy::gets`] once every one of them has ended (waiting at most `within`). The
    /// proxy notes an exchange ended when its connection closes, which can trail the last
    /// byte the client saw by a moment.
    pub async fn finished_gets(&self, path: &str, within: Duration) -> Result<Vec<ProxiedRequest>> {
        crate::poll_until("the proxied GETs to finish", within, Duration::from_millis(20), || {
            let gets = self.gets(path);
            let done = gets.iter().all(|r| r.finished.is_some());
            async move { Ok(done.then_some(gets)) }
        })
        .await
    }

    /// Stops accepting and aborts every open connection.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Dropping the JoinSet (when this task is aborted) aborts every connection task.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let Ok(permit) = limit.clone().acquire_owned().await else { return };
                let shared = shared.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(MAX_CONNECTION_LIFETIME, handle(client, shared)).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

async fn handle(mut client: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    // Read the request head.
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Ok(());
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut new_head = format!("{request_line}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        new_head.push_str(line);
        new_head.push_str("\r\n");
    }
    new_head.push_str("Connection: close\r\n\r\n");

    let config = shared.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let path_ok = match config.path_contains.as_deref() {
        Some(p) => path.contains(p),
        None => true,
    };
    let method_ok = match config.method.as_deref() {
        Some(m) => m == method,
        None => true,
    };
    let has_faults = config.bytes_per_sec.is_some()
        || config.total_bytes_per_sec.is_some()
        || config.corrupt_body_offset.is_some();
    let faulty = has_faults && path_ok && method_ok;
    let index = {
        let mut log = shared.log.lock().unwrap_or_else(|e| e.into_inner());
        log.push(ProxiedRequest {
            method: method.clone(),
            path: path.clone(),
            faulty,
            corrupted: false,
            response_bytes: 0,
            started: Instant::now(),
            finished: None,
        });
        log.len() - 1
    };

    let mut upstream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(shared.upstream))
        .await
        .map_err(|_| std::io::Error::other("connect to upstream timed out"))??;
    upstream.write_all(new_head.as_bytes()).await?;
    upstream.write_all(&buf[head_end..]).await?;

    let (mut client_read, mut client_write) = client.split();
    let (mut up_read, mut up_write) = upstream.split();
    // Request bodies (none for GET/HEAD) pass through unchanged.
    let to_upstream = async {
        let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
    };
    let rate = if faulty { config.bytes_per_sec } else { None };
    let total_rate = if faulty { config.total_bytes_per_sec } else { None };
    let corrupt_at = if faulty { config.corrupt_body_offset } else { None };
    let to_client = async {
        let slowest = match (rate, total_rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let chunk_size = match slowest {
            Some(r) => (r / 20).clamp(512, 64 * 1024) as usize,
            None => 64 * 1024,
        };
        let mut chunk = vec![0u8; chunk_size];
        let start = Instant::now();
        let mut sent: u64 = 0;
        // Until the header terminator is seen, keep the tail of the head to find it.
        let mut head_tail: Vec<u8> = Vec::new();
        let mut body_offset: Option<u64> = None;
        let mut corrupted = false;
        loop {
            let n = match up_read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &mut chunk[..n];
            let body_start_in_chunk = match body_offset {
                Some(_) => Some(0),
                None => {
                    let keep = head_tail.len();
                    head_tail.extend_from_slice(data);
                    match find_head_end(&head_tail) {
                        Some(end) => {
                            let start = end - keep;
                            body_offset = Some(0);
                            head_tail.clear();
                            Some(start)
                        }
                        None => {
                            let cut = head_tail.len().saturating_sub(3);
                            head_tail.drain(..cut);
                            None
                        }
                    }
                }
            };
            if let (Some(start_in_chunk), Some(target), Some(offset)) =
                (body_start_in_chunk, corrupt_at, body_offset)
            {
                let body_len = (n - start_in_chunk) as u64;
                if target >= offset && target < offset + body_len {
                    data[start_in_chunk + (target - offset) as usize] ^= 0xff;
                    corrupted = true;
                }
                body_offset = Some(offset + body_len);
            }
            if client_write.write_all(data).await.is_err() {
                break;
            }
            sent += n as u64;
            if let Some(r) = rate {
                let due = Duration::from_secs_f64(sent as f64 / r.max(1) as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if let Some(r) = total_rate {
                tokio::time::sleep(shared.shared_delay(r, n as u64)).await;
            }
        }
        let _ = client_write.shutdown().await;
        (sent, corrupted)
    };
    // The exchange ends when the origin closes (it was told `Connection: close`).
    let (sent, corrupted) = tokio::select! {
        r = to_client => r,
        _ = async { to_upstream.await; std::future::pending::<()>().await } => unreachable!(),
    };
    let mut log = shared.log.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = log.get_mut(index) {
        entry.response_bytes = sent;
        entry.corrupted = corrupted;
        entry.finished = Some(Instant::now());
    }
    Ok(())
}
