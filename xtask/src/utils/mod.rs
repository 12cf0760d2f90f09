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

/// `cargo`: the one running this xtask (`$CARGO`), else the one on the path, without the package
/// variables `cargo run` gave this process.
///
/// Why: `cargo run -p xtask` sets `CARGO_MANIFEST_DIR=…/xtask`, `CARGO_PKG_NAME=xtask` and the like in
/// our environment. Build scripts that rerun when those change (ring's, through cc: `rerun-if-env-changed`)
/// would see other values in a cargo started from here than in one started from the shell, and ring,
/// rustls, ureq and everything above them would be rebuilt each time the two alternate.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if is_package_variable(key) {
            command.env_remove(key);
        }
    }
    command
}

/// The variables cargo sets for the package it runs (see [`cargo`]).
fn is_package_variable(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || matches!(
            key,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

/// The target folder cargo builds into (`$CARGO_TARGET_DIR`, else `target/` under the workspace).
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
}

/// Makes `command`'s process die with this one (Linux: `PR_SET_PDEATHSIG`). Without it a `kill -9` of
/// the pipeline would leave its `supportlm` step running, and the resumed pipeline would start a second
/// writer on the same folder.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; this runs in the
        // forked child before exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    command
}

/// Holds `dir` for this process (an advisory lock on `dir/.lock`, released when the process ends, `kill -9`
/// included); `what` names the holder in the error a second process gets.
pub fn lock_folder(dir: &Path, what: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("another {what} is running in {}", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `url` answers (any status), for at most `limit`.
pub fn wait_for(url: &str, limit: std::time::Duration) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let started = std::time::Instant::now();
    while agent.get(url).call().is_err() {
        anyhow::ensure!(
            started.elapsed() < limit,
            "{url} did not answer within {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}

/// Starts `supportlm serve` on 127.0.0.1 and a free port with `extra` arguments, and waits until it
/// answers. The server dies with this process; stop it with SIGTERM.
pub fn start_serve(extra: &[String]) -> anyhow::Result<(std::process::Child, u16)> {
    let root = workspace_root();
    let exe = build_cli(&root)?;
    let port = free_port()?;
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--max-queue", "256"])
        .args(extra)
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let child = die_with_parent(&mut cmd).spawn()?;
    wait_for(
        &format!("http://127.0.0.1:{port}/health"),
        std::time::Duration::from_secs(300),
    )?;
    Ok((child, port))
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

/// Runs `exe args` in `root`, its stdout and stderr appended to `log`, after announcing it as
/// `[tag] supportlm …` on stderr; the child dies with this process (see [`die_with_parent`]).
pub fn run_logged(
    exe: &Path,
    root: &Path,
    log: &Path,
    tag: &str,
    args: &[String],
) -> anyhow::Result<std::process::ExitStatus> {
    use anyhow::Context;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    eprintln!("[{tag}] supportlm {}", args.join(" "));
    die_with_parent(&mut Command::new(exe))
        .args(args)
        .current_dir(root)
        .stdout(file.try_clone()?)
        .stderr(file)
        .stdin(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", exe.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_variables_of_cargo_run_are_not_passed_on() {
        for key in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "OUT_DIR",
        ] {
            assert!(is_package_variable(key), "{key}");
        }
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "PATH",
            "RUSTFLAGS",
        ] {
            assert!(!is_package_variable(key), "{key}");
        }
    }
}
