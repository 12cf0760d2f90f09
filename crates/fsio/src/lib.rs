//! Atomic file writes and sha256, shared by every supportlm crate that writes files.
//!
//! Writing through [`write_atomic`] means a reader never sees a half-written file and an interrupted
//! write never destroys the previous version; [`leftovers`] finds the temporary files and folders a
//! killed writer leaves, so a resumed run can name and remove them. [`chaos`] holds the kill points
//! crash tests use. Errors are plain `std::io::Error`s; callers add the path and their own context.

pub mod chaos;

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Lower-case hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lower-case hex sha256 of a file, streamed (large model files are not read into memory).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, synced and
/// renamed over `path`. Creates the folder if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    let tmp = dir.join(format!(".{file_name}.{}{TMP_SUFFIX}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let (first, second) = bytes.split_at(bytes.len() / 2);
        f.write_all(first)?;
        chaos::point("write_atomic: half of a temporary file written");
        f.write_all(second)?;
        check_write_budget(bytes.len())?;
        f.sync_all()?;
        chaos::point("write_atomic: before the rename");
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The ending of every temporary file or folder the supportlm writers create next to their target
/// (`.name.PID.tmp` for files, `name.tmp` or `.tmp-name` folders are named by their writers).
pub const TMP_SUFFIX: &str = ".tmp";

/// Temporary files and folders directly inside `dir` that an interrupted writer left: names ending in
/// [`TMP_SUFFIX`] or starting with `.tmp-`. Sorted; empty when `dir` does not exist.
pub fn leftovers(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(TMP_SUFFIX) || name.starts_with(".tmp-") {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Removes a leftover file or folder (see [`leftovers`]).
pub fn remove_leftover(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

thread_local! {
    /// Bytes [`write_atomic`] may still write on this thread before it fails as a full disk would.
    static WRITE_BUDGET: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Test hook: makes [`write_atomic`] on this thread fail with `StorageFull` (as `ENOSPC` would) once it
/// has written `bytes` more bytes; `None` lifts the limit. For testing what a full disk leaves behind;
/// nothing else calls it.
pub fn simulate_disk_full_after(bytes: Option<u64>) {
    WRITE_BUDGET.with(|b| b.set(bytes));
}

fn check_write_budget(len: usize) -> std::io::Result<()> {
    WRITE_BUDGET.with(|b| match b.get() {
        None => Ok(()),
        Some(left) => match left.checked_sub(len as u64) {
            Some(rest) => {
                b.set(Some(rest));
                Ok(())
            }
            None => {
                b.set(Some(0));
                Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device (simulated)",
                ))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_string() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(sha256_file(&p).unwrap(), sha256_hex(b"two"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_full_disk_keeps_the_previous_version_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"previous").unwrap();
        simulate_disk_full_after(Some(4));
        let err = write_atomic(&p, b"the next version").unwrap_err();
        simulate_disk_full_after(None);
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
        assert_eq!(std::fs::read(&p).unwrap(), b"previous");
        assert!(leftovers(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn leftovers_are_the_temporary_names_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a.json",
            ".a.json.12.tmp",
            "adapter.tmp",
            ".tmp-checkpoint-000002",
            "b",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let names: Vec<String> = leftovers(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [".a.json.12.tmp", ".tmp-checkpoint-000002", "adapter.tmp"]
        );
    }
}
