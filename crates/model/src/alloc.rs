//! Process-wide allocator settings for long CPU runs.
//!
//! A forward pass allocates and frees many tensors of a few megabytes. glibc serves blocks above its
//! mmap threshold (128 KiB, growing only on free) with fresh `mmap`s, so every such tensor costs page
//! faults and zeroed pages; and it trims the heap top back to the system on free. Raising both
//! thresholds keeps freed blocks for reuse (Task 1 scoring runs measurably faster, same predictions).
//! And one arena for all threads: the training step runs on rayon's workers, and with an arena per
//! thread each kept its own freed blocks, which raised a QLoRA step's peak memory by about 70%. The
//! measurements are in the README. No effect on other allocators or systems.

/// Largest mmap threshold glibc accepts on 64-bit systems (its `DEFAULT_MMAP_THRESHOLD_MAX`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;

/// Keep up to this much free memory at the heap top before returning it to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1024 * 1024 * 1024;

/// Arenas glibc may create: one, shared by every thread (the blocks a step frees on one worker are
/// reused by the next allocation on any other).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 1;

/// Applies the settings; call once at the start of a binary, before the work starts. Returns whether
/// they were applied (only with glibc).
pub fn tune_for_tensors() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
        // starts allocating, and invalid values are rejected by returning 0.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_ARENA_MAX, ARENAS) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Memory this process could still get without swapping anything out: `MemAvailable` plus free swap
/// from `/proc/meminfo` (Linux); `None` where that is unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kb| kb * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// Refuses to load `what` when it needs more than the memory available (see [`available_memory`]), so
/// a file whose header promises terabytes fails with a message instead of the OOM killer.
pub fn ensure_fits(what: &str, needed: u64) -> crate::Result<()> {
    match available_memory() {
        Some(available) if needed > available => Err(crate::ModelError::TooLarge {
            what: what.to_string(),
            needed,
            available,
        }),
        _ => Ok(()),
    }
}
