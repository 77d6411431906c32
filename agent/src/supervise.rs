//! Supervision of the agent's long-running tasks, so that SIGTERM ends in a clean exit.
//!
//! Every task that outlives one request (the swarm loop, serving peers and each upload,
//! heartbeats, the stats export, the provider-record queue, preheat jobs) is spawned through
//! one [`Supervisor`]. It hands each a [`CancellationToken`] to `select!` on and counts the
//! tasks still alive, by name. Shutdown is then: cancel, give every task up to the grace
//! period to finish what it does, and report (by name) whatever did not, so a hung task is
//! visible in the log instead of silently holding the process.
//!
//! It is the mini-redis shape (a shutdown signal plus a way to wait for everyone), with the
//! waiting bounded. tokio-util's `TaskTracker` does the same but needs its `rt` feature, which
//! would rebuild hyper, h2, axum and reqwest; this is forty lines.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
pub use tokio_util::sync::CancellationToken;

/// Spawns and counts long-running tasks; cloning shares them.
#[derive(Clone, Default)]
pub struct Supervisor {
    token: CancellationToken,
    live: Arc<Live>,
}

#[derive(Default)]
struct Live {
    /// Alive tasks by name.
    tasks: Mutex<BTreeMap<&'static str, usize>>,
    changed: Notify,
}

/// Decrements its task's count when the task ends, returns or is dropped (aborted).
struct Alive {
    live: Arc<Live>,
    name: &'static str,
}

impl Drop for Alive {
    fn drop(&mut self) {
        {
            let mut tasks = crate::sync::lock(&self.live.tasks);
            if let Some(n) = tasks.get_mut(self.name) {
                *n -= 1;
                if *n == 0 {
                    tasks.remove(self.name);
                }
            }
        }
        self.live.changed.notify_waiters();
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Supervisor::default()
    }

    /// Cancelled when shutdown starts.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Completes when shutdown starts.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Spawns `task`, counted under `name` until it ends. The task is expected to watch
    /// [`Supervisor::token`] and return soon after it is cancelled.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        *crate::sync::lock(&self.live.tasks).entry(name).or_default() += 1;
        let alive = Alive { live: self.live.clone(), name };
        tokio::spawn(async move {
            let _alive = alive;
            task.await
        })
    }

    /// Tasks alive now, by name.
    pub fn alive(&self) -> BTreeMap<&'static str, usize> {
        crate::sync::lock(&self.live.tasks).clone()
    }

    /// Starts shutdown: every task's token is cancelled.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Waits until every task ended, at most `grace`. `Err` names the tasks still alive.
    pub async fn wait(&self, grace: Duration) -> Result<(), BTreeMap<&'static str, usize>> {
        let all_done = async {
            loop {
                let changed = self.live.changed.notified();
                tokio::pin!(changed);
                // Register before looking, so an end between the look and the wait is seen.
                changed.as_mut().enable();
                if crate::sync::lock(&self.live.tasks).is_empty() {
                    return;
                }
                changed.await;
            }
        };
        match tokio::time::timeout(grace, all_done).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.alive()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_cancelled_tasks_and_names_the_stuck_ones() {
        let sup = Supervisor::new();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let token = sup.token();
        sup.spawn("polite", async move {
            token.cancelled().await;
            // Some work after the signal, e.g. saving state.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = done_tx.send(());
        });
        sup.spawn("stuck", std::future::pending::<()>());
        assert_eq!(sup.alive().values().sum::<usize>(), 2);
        assert!(sup.wait(Duration::from_millis(20)).await.is_err(), "nothing was cancelled yet");
        sup.cancel();
        let stuck = sup.wait(Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(stuck.into_iter().collect::<Vec<_>>(), vec![("stuck", 1)]);
        done_rx.await.expect("the polite task finished its work after the signal");
    }

    #[tokio::test]
    async fn an_aborted_task_is_no_longer_counted() {
        let sup = Supervisor::new();
        let handle = sup.spawn("aborted", std::future::pending::<()>());
        handle.abort();
        let _ = handle.await;
        assert!(sup.wait(Duration::from_secs(1)).await.is_ok());
        sup.spawn("quick", async {});
        assert!(sup.wait(Duration::from_secs(1)).await.is_ok());
    }
}
