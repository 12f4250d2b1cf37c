//! Bounded waits. A test never sleeps to let something happen: it polls the condition
//! it needs, under a deadline, and fails naming what did not happen. These are the only
//! places the harness sleeps, and only as the interval between two polls.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// Every await in a test is bounded by this: a hung test fails instead of hanging CI.
pub const STEP: Duration = Duration::from_secs(20);

/// How long a poll waits before it looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .expect("step timed out")
}

/// Calls `check` until it returns `Some`, for at most `limit`; `None` if it never did.
/// Blocks the thread: for synchronous tests and processes outside this one.
pub fn poll_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`poll_for`], failing the test with "timed out after LIMIT waiting for WHAT".
pub fn wait_for<T>(limit: Duration, what: impl Display, check: impl FnMut() -> Option<T>) -> T {
    poll_for(limit, check).unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Waits until `condition` holds, for at most `limit`; past it the test fails naming
/// `what`.
pub fn wait_until(limit: Duration, what: impl Display, mut condition: impl FnMut() -> bool) {
    wait_for(limit, what, || condition().then_some(()))
}

/// [`poll_for`] inside a runtime: the other tasks run while it waits, and under paused
/// time the deadline is the runtime's clock.
pub async fn poll_for_async<T>(
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`wait_for`] inside a runtime.
pub async fn wait_for_async<T>(
    limit: Duration,
    what: impl Display,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    poll_for_async(limit, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// [`wait_until`] inside a runtime.
pub async fn wait_until_async(
    limit: Duration,
    what: impl Display,
    mut condition: impl FnMut() -> bool,
) {
    wait_for_async(limit, what, async || condition().then_some(())).await
}
