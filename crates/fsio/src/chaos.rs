//! Kill points for crash testing (`cargo xtask chaos-train`).
//!
//! Code that writes state a run resumes from calls [`point`] at the moments a crash would hurt most:
//! between the halves of a write, before a rename, after each unit of work. Normally a point costs one
//! atomic load and does nothing. With `SUPPORTLM_CHAOS_TRACE=FILE` every point appends `n name` to
//! `FILE` (so a harness learns how many points a run has and which one a kill landed on); with
//! `SUPPORTLM_CHAOS_KILL_AT=N` the process sends itself `SIGKILL` at its `N`-th point: no destructor,
//! no flush, no signal handler runs, exactly like `kill -9` or the OOM killer.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the point (1-based count) at which the process kills itself.
pub const KILL_AT_ENV: &str = "SUPPORTLM_CHAOS_KILL_AT";
/// The environment variable naming a file every point is appended to.
pub const TRACE_ENV: &str = "SUPPORTLM_CHAOS_TRACE";

struct Chaos {
    kill_at: Option<u64>,
    trace: Option<Mutex<std::fs::File>>,
    count: AtomicU64,
}

fn chaos() -> Option<&'static Chaos> {
    static CHAOS: OnceLock<Option<Chaos>> = OnceLock::new();
    CHAOS
        .get_or_init(|| {
            let kill_at = std::env::var(KILL_AT_ENV)
                .ok()
                .and_then(|v| v.trim().parse().ok());
            let trace = std::env::var_os(TRACE_ENV).and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
                    .map(Mutex::new)
            });
            (kill_at.is_some() || trace.is_some()).then(|| Chaos {
                kill_at,
                trace,
                count: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Whether crash testing is on in this process (a point may kill it).
pub fn active() -> bool {
    chaos().is_some()
}

/// A moment at which a crash must leave resumable state. See the module documentation.
pub fn point(name: &str) {
    let Some(c) = chaos() else { return };
    let n = c.count.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(trace) = &c.trace {
        if let Ok(mut f) = trace.lock() {
            let _ = writeln!(f, "{n} {name}");
        }
    }
    if c.kill_at == Some(n) {
        kill_self();
    }
}

#[cfg(unix)]
fn kill_self() -> ! {
    // SAFETY: getpid and kill have no preconditions; SIGKILL cannot be caught, so kill does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

#[cfg(not(unix))]
fn kill_self() -> ! {
    std::process::abort()
}
