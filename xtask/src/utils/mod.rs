//! Helpers every command shares: where the workspace is and how to run cargo.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo`: the one running this xtask (`$CARGO`), else the one on the path.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The target folder cargo builds into (`$CARGO_TARGET_DIR`, else `target/` under the workspace).
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
}

/// Builds the `supportlm` binary (dev profile) and returns its path. Cargo's progress stays visible:
/// on a cold machine this is the half-hour build a user should see moving.
pub fn build_cli(root: &Path) -> anyhow::Result<PathBuf> {
    let status = cargo()
        .args(["build", "-p", "supportlm"])
        .current_dir(root)
        .status()?;
    anyhow::ensure!(status.success(), "building the supportlm binary failed");
    Ok(target_dir(root).join("debug").join("supportlm"))
}
