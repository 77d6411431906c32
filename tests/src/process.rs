//! Child processes: long-running daemons killed on drop, and bounded one-shot commands.
//!
//! Daemons are plain `std::process::Child`ren with stdout+stderr appended to a log file.
//! `Drop` kills them by pid (SIGKILL) and reaps them, so a panicking test leaves nothing
//! behind. One-shot commands (`skopeo`, `ctr`, the agent's CLI-failure runs) use tokio with
//! `kill_on_drop` under a timeout.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{scrub_env, tail_file};

/// A running daemon, killed (SIGKILL, by pid) and reaped on drop.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Result<Daemon> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open log {}", log_path.display()))?;
        scrub_env(&mut cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log));
        let child = cmd.spawn().with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(Daemon { name: name.to_string(), child: Some(child), log_path: log_path.to_path_buf() })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last 8 KiB of the log.
    pub fn log_tail(&self) -> String {
        tail_file(&self.log_path, 8192)
    }

    /// `Some(status)` if the process has exited (it is reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Errors (with the log tail) if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.exited() {
            bail!(
                "{} exited early with {status}; log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// SIGKILL and reap (bounded). Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            // SIGKILL cannot be ignored; wait() returns promptly.
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to `grace` for exit, then SIGKILL. Returns the exit status if the
    /// process exited by itself within the grace period.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on the pid of our own unreaped child; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for _ in 0..10_000 {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a one-shot command produced.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} after {:?}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            self.status,
            self.elapsed,
            tail_str(&self.stdout, 4000),
            tail_str(&self.stderr, 4000)
        )
    }
}

fn tail_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Runs a command to completion with a timeout. The child is killed if the timeout
/// passes (or the future is dropped). A non-zero exit is *not* an error here.
pub async fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<CmdOutput> {
    scrub_env(&mut cmd);
    cmd.stdin(Stdio::null());
    let desc = format!("{cmd:?}");
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let start = Instant::now();
    let output = match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(out) => out.with_context(|| format!("run {desc}"))?,
        Err(_) => bail!("command did not finish within {timeout:?} (killed): {desc}"),
    };
    Ok(CmdOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// Like [`run_bounded`], but a non-zero exit is an error carrying the output.
pub async fn run_checked(cmd: Command, timeout: Duration) -> Result<CmdOutput> {
    let desc = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout).await?;
    if !out.success() {
        bail!("command failed: {desc}\n{out}");
    }
    Ok(out)
}
