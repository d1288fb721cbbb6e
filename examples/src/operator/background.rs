//! Where filtered queries run: a small pool of threads at a lower CPU priority.
//!
//! A filtered summary or page evaluates its filter over the tenant's instances, taking the live
//! view's lock a bounded step at a time ([`fleet_core::live::query`]), so it never holds up a
//! heartbeat for long. What remains is the CPU itself: four operators sending the heaviest
//! filter in a loop keep a core busy. The pool's threads lower their own priority (nice 10 on
//! Linux, where a thread's nice value is its own), so when queries and heartbeats want the same
//! core the scheduler serves heartbeats first, and queries take the time that is left.
//! Elsewhere the threads run at normal priority.
//!
//! The queue is bounded: when it is full, a query is answered `503 busy` at once rather than
//! waiting behind the others.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

type Job = Box<dyn FnOnce() + Send>;

/// Nice value of the pool's threads.
pub const QUERY_NICE: i32 = 10;
/// Queries waiting for a thread before more are refused.
pub const QUERY_QUEUE: usize = 256;

/// Why a query did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRun {
    /// The queue is full.
    Busy,
    /// The query panicked (its thread goes on).
    Failed,
}

/// The pool (see the module docs).
#[derive(Debug)]
pub(crate) struct QueryPool {
    jobs: SyncSender<Job>,
}

impl QueryPool {
    /// A pool of `threads` threads; they end when the pool is dropped.
    pub(crate) fn new(threads: usize) -> Self {
        let (jobs, queue) = sync_channel::<Job>(QUERY_QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            // A thread that cannot be started leaves the others to do the work; with none, every
            // query waits in the queue and is then refused as busy.
            let _ = std::thread::Builder::new()
                .name(format!("fleet-query-{i}"))
                .spawn(move || work(&queue));
        }
        Self { jobs }
    }

    /// Runs `f` on the pool and returns its result.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NotRun> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => return Err(NotRun::Busy),
        }
        // A panicking query drops its sender.
        rx.await.map_err(|_| NotRun::Failed)
    }
}

fn work(queue: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        // A query that panics answers 500; the thread stays for the next one.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux the nice value belongs to the thread: PRIO_PROCESS with a thread id sets it for
    // this thread alone. Raising a nice value needs no privilege.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), QUERY_NICE);
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_reports_panics_and_lowers_its_priority() {
        let pool = QueryPool::new(1);
        assert_eq!(pool.run(|| 2 + 2).await, Ok(4));
        assert_eq!(
            pool.run(|| -> u32 { panic!("a query that panics") }).await,
            Err(NotRun::Failed)
        );
        // The thread survived the panic.
        assert_eq!(pool.run(|| 5).await, Ok(5));
        #[cfg(target_os = "linux")]
        {
            let nice = pool
                .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                nice, QUERY_NICE,
                "the pool's threads run at nice {QUERY_NICE}"
            );
        }
    }
}
