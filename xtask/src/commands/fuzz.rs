//! `cargo xtask fuzz`: the fuzz targets (`tests/fuzz.rs` of the crates that parse user files) with more
//! inputs than the bounded run `cargo xtask test` does, and a seed of one's choice. Each target prints
//! its inputs, loads and refusals; a panic, a hang or an oversized allocation fails with the input saved
//! under the system's temporary folder (`supportlm-fuzz/`).

use supportlm_fuzzing::{ITERATIONS_ENV, SEED_ENV};

/// The crates with a `tests/fuzz.rs`.
pub const CRATES: [&str; 5] = [
    "supportlm-quant",
    "supportlm-model",
    "supportlm-data",
    "supportlm-train",
    "supportlm-prompting",
];

/// `cargo xtask fuzz` options.
#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Inputs per target (the bounded CI run uses 2,000; a few targets scale it down or up).
    #[arg(long, default_value_t = 50_000)]
    iterations: u64,
    /// Seed of the inputs (input `i` of a seed is the same on every machine).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only the targets whose test name contains this (e.g. `gguf`, `adapter`, `csv`).
    filter: Option<String>,
}

pub fn run(args: FuzzArgs) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    let mut cmd = crate::utils::cargo();
    cmd.arg("test");
    for c in CRATES {
        cmd.args(["-p", c]);
    }
    cmd.args(["--test", "fuzz", "--", "--nocapture"]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    let status = cmd
        .env(ITERATIONS_ENV, args.iterations.to_string())
        .env(SEED_ENV, args.seed.to_string())
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "a fuzz target failed (its message names the input)"
    );
    Ok(())
}
