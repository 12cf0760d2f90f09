//! `supportlm data …`: statistics and splits of the shipped (or your own) Bitext CSV.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use supportlm_data::{load_csv, robustness, shipped, split, stats, SplitConfig, Task};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Print label counts and message/response length distributions.
    Stats {
        /// A Bitext CSV (columns flags,instruction,category,intent,response). Default: the shipped all-rows file.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a leak-free stratified train/validation/test split (JSONL + manifest.json).
    Split(SplitArgs),
    /// Write the robustness set (prompt injection, abusive, off-topic and noisy messages), made from
    /// the shipped data's category test split only.
    Robustness {
        /// Output file (one item per line).
        #[arg(long, default_value = "data/robustness/robustness.jsonl")]
        out: PathBuf,
        /// Clean test messages sampled (balanced over categories); each gets every attack family,
        /// an abusive and a noisy variant.
        #[arg(long, default_value_t = 66)]
        messages: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Args)]
pub struct SplitArgs {
    /// A Bitext CSV. Default: the shipped all-rows file (26,872 rows).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Folder to write train.jsonl, validation.jsonl, test.jsonl and manifest.json into.
    #[arg(long, default_value = "data/splits/category")]
    out: PathBuf,
    /// Which label to stratify by: category (11), intent (27), or response (rows with a known response, by category).
    #[arg(long, default_value = "category")]
    task: Task,
    /// Seed of every random choice; the same seed gives byte-identical files.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of each label that goes to validation.
    #[arg(long, default_value_t = 0.1)]
    val_ratio: f64,
    /// Share of each label that goes to test.
    #[arg(long, default_value_t = 0.1)]
    test_ratio: f64,
    /// Keep only one row per instruction (case and whitespace ignored). Without it, copies stay together in one split.
    #[arg(long)]
    dedupe: bool,
    /// Drop labels with fewer rows than this.
    #[arg(long)]
    min_per_label: Option<usize>,
    /// Keep at most this many rows per label (seeded choice).
    #[arg(long)]
    max_per_label: Option<usize>,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Stats { input, json } => {
            let dataset = load(input)?;
            let stats = stats::stats(&dataset.records);
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!("{}\n{stats}", dataset.path.display());
            }
        }
        DataCommand::Split(args) => {
            let dataset = load(args.input)?;
            let config = SplitConfig {
                task: args.task,
                seed: args.seed,
                val_ratio: args.val_ratio,
                test_ratio: args.test_ratio,
                dedupe: args.dedupe,
                min_per_label: args.min_per_label,
                max_per_label: args.max_per_label,
            };
            let set = split::split(&dataset, &config)?;
            let manifest = set
                .write(&args.out, &dataset)
                .with_context(|| format!("writing the split to {}", args.out.display()))?;
            for (name, s) in &manifest.splits {
                println!(
                    "{name:<10} {:>6} rows  {:>6} unique instructions  {:>5} duplicates  sha256 {}",
                    s.rows, s.unique_instructions, s.duplicates, s.sha256
                );
            }
            if !manifest.dropped_labels.is_empty() {
                println!("dropped labels: {}", manifest.dropped_labels.join(", "));
            }
            println!("wrote {}", args.out.join("manifest.json").display());
        }
        DataCommand::Robustness {
            out,
            messages,
            seed,
        } => {
            let dataset = load(None)?;
            let set = split::split(&dataset, &SplitConfig::default())?;
            let config = robustness::RobustnessConfig { messages, seed };
            let items = robustness::build(&set.test.records, &config);
            let mut text = String::new();
            for item in &items {
                text += &serde_json::to_string(item)?;
                text.push('\n');
            }
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            supportlm_data::fsio::write_atomic(&out, text.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            for part in robustness::Part::ALL {
                let n = items.iter().filter(|i| i.part == part).count();
                println!("{:<10} {n:>5} items", part.as_str());
            }
            println!(
                "wrote {} (sha256 {})",
                out.display(),
                supportlm_data::fsio::sha256_hex(text.as_bytes())
            );
        }
    }
    Ok(())
}

fn load(input: Option<PathBuf>) -> anyhow::Result<supportlm_data::load::Dataset> {
    let path = input.unwrap_or_else(shipped::default_input);
    shipped::verify_if_shipped(&path)?;
    let dataset = load_csv(&path)?;
    tracing::info!(rows = dataset.records.len(), file = %path.display(), "loaded");
    Ok(dataset)
}
