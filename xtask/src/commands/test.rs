//! `cargo xtask test`: fetch what the tests need (setup), then run the whole test suite.

use std::path::Path;

/// Fetches the models (hash-checked) and runs `cargo test --workspace`.
pub fn run(root: &Path) -> anyhow::Result<()> {
    super::setup::run(root)?;
    let status = crate::utils::cargo()
        .args(["test", "--workspace"])
        .current_dir(root)
        .status()?;
    anyhow::ensure!(status.success(), "tests failed");
    Ok(())
}
