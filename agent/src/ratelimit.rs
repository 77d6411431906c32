//! A token bucket for `--max-upload-rate` and `--max-download-rate`: callers ask for the
//! bytes they are about to move and wait until the bucket allows them. One bucket is shared
//! by every transfer in its direction, so the limit holds for the node as a whole.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimiter {
    /// Bytes per second; `None` is unlimited.
    rate: Option<u64>,
    state: Mutex<Bucket>,
}

struct Bucket {
    /// May go negative: a large request borrows from the future and later callers wait.
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: Option<u64>) -> Self {
        let burst = rate.map(|r| r as f64 * BURST.as_secs_f64()).unwrap_or(0.0);
        RateLimiter { rate, state: Mutex::new(Bucket { tokens: burst, last: Instant::now() }) }
    }

    pub fn unlimited() -> Self {
        RateLimiter::new(None)
    }

    /// Waits until `bytes` may be moved.
    pub async fn acquire(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut b = crate::sync::lock(&self.state);
            let now = Instant::now();
            let burst = rate as f64 * BURST.as_secs_f64();
            b.tokens = (b.tokens + (now - b.last).as_secs_f64() * rate as f64).min(burst);
            b.last = now;
            b.tokens -= bytes as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / rate as f64)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// How much may move at once after an idle spell.
const BURST: Duration = Duration::from_millis(100);

/// Parses a rate like `100MiB/s` (a byte size, optionally followed by `/s`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let size = s.trim().strip_suffix("/s").unwrap_or(s.trim());
    let bytes = crate::config::parse_bytes(size)?;
    if bytes == 0 {
        return Err(format!("{s:?}: a rate must be above 0 (omit the flag for no limit)"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_rate("1GB"), Ok(1_000_000_000));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn limits_throughput() {
        let limiter = RateLimiter::new(Some(1000));
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            limiter.acquire(300).await;
        }
        // 3000 bytes at 1000 B/s with a 100-byte burst: about 2.9 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2800) && took <= Duration::from_millis(3100), "{took:?}");
        RateLimiter::unlimited().acquire(u64::MAX).await;
    }
}
