//! `supportlm`: the command line. Argument parsing and wiring only; the work lives in the library crates.

mod adapter;
mod classify;
mod data;
mod eval;
mod generate;
mod human;
mod respond;
mod resume;
mod robustness;
mod serve;
mod shared;
mod train;

use clap::{Parser, Subcommand};

/// Logging when RUST_LOG is not set: our progress lines; not wgpu's report of the graphics APIs it
/// probed and did not find (harmless: e.g. no OpenGL driver beside Vulkan).
const DEFAULT_LOG: &str = "info,wgpu_hal=off,wgpu_core=warn";

/// Exit status after Ctrl-C (128 + SIGINT, as shells report a process the signal ended).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Fine-tune a small open LLM into a customer-support assistant and measure it against prompting.
#[derive(Parser)]
#[command(
    name = "supportlm",
    version,
    about,
    long_about = None,
    after_help = "Exit status: 0 success, 1 error (the message names the file or value at fault), \
                  130 interrupted by Ctrl-C (`train` checkpoints first; rerun with --resume)."
)]
struct Cli {
    /// Where models run: cpu, wgpu, wgpu:N, cuda or cuda:N (GPU backends need a binary built with
    /// `--features wgpu` or `cuda`; docs/GPU.md). Default: $SUPPORTLM_DEVICE, else cpu.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and split the Bitext customer-support data.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Classify one customer message: its label, confidence and runners-up.
    Classify(classify::ClassifyArgs),
    /// Generate text with a model (GGUF file or Hugging Face folder), optionally with an adapter.
    Generate(generate::GenerateArgs),
    /// Evaluate prompting baselines and fine-tuned adapters.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Fine-tune a LoRA / QLoRA adapter (see configs/).
    Train(train::TrainArgs),
    /// Inspect LoRA adapters; merge one into its base and export a Hugging Face folder.
    #[command(subcommand)]
    Adapter(adapter::AdapterCommand),
    /// Serve the model and its adapters: the demo API, an OpenAI-compatible endpoint and a web page.
    Serve(serve::ServeArgs),
}

fn main() -> std::process::ExitCode {
    supportlm_model::alloc::tune_for_tensors();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .init();
    let cli = Cli::parse();
    shared::choose_device(cli.device.as_deref());
    let result = match cli.command {
        Command::Data(cmd) => data::run(cmd),
        Command::Classify(args) => classify::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Adapter(cmd) => adapter::run(cmd),
        Command::Train(args) => train::run(args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<supportlm_train::TrainError>() {
            Some(supportlm_train::TrainError::Interrupted { step }) => {
                eprintln!(
                    "interrupted at step {step} (checkpoint written); continue with the same command and --resume"
                );
                std::process::ExitCode::from(EXIT_INTERRUPTED)
            }
            _ => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
