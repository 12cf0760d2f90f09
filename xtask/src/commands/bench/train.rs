//! `cargo xtask bench train`: one training step of the default model per mode (LoRA on an f32, int8 or
//! NF4 base, and full fine-tuning) at batch 8 x 128 and 4 x 64 tokens: tokens/s, peak RSS, and the
//! effective GFLOP/s as a share of the backend's matmul GFLOP/s measured in the same run.
//!
//! Each (mode, shape) runs in its own child process (`bench train-step`) so that peaks do not mix; the
//! child runs a warm-up step and [`TIMED_STEPS`] timed ones (loss, gradients, AdamW update). Each timed
//! step lies between two windows of back-to-back matmuls as long as itself (at most [`MAX_WINDOW_S`])
//! and is compared with their mean rate: the machine's matmul rate at the moment the step ran (this
//! VM's speed drifts by a third within minutes, so the fastest step and the fastest window, taken
//! apart, can come from different moments). The row reports the step whose share is the median. The
//! burst matmul rate (fastest single product of 30) is reported beside it.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use supportlm_model::config::ModelConfig;
use supportlm_model::default_device;
use supportlm_model::lora::{Adapter, LoraConfig};
use supportlm_model::model::Checkpoint;
use supportlm_train::optim::{AdamState, AdamW};
use supportlm_train::qlora::{Dropout, QloraModel, Sequence, StepPath};
use supportlm_train::trainer::{current_rss, peak_rss, Weights};
use supportlm_train::BaseQuant;

use super::Gemm;

/// A deterministic batch: `batch` rows of `seq` tokens, the second half of each row as targets.
pub fn synthetic_batch(batch: usize, seq: usize, vocab: usize) -> Vec<Sequence> {
    (0..batch)
        .map(|r| {
            let ids: Vec<u32> = (0..seq)
                .map(|t| (1000 + (r * 7919 + t * 104_729) % (vocab - 1000)) as u32)
                .collect();
            let loss_mask = (0..seq).map(|t| t >= seq / 2).collect();
            Sequence { ids, loss_mask }
        })
        .collect()
}

/// What a step trains: LoRA over a base in some format, or every parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Lora(BaseQuant),
    /// LoRA with each layer recomputed in backward instead of its activations kept
    /// (`StepPath::Recompute`): the memory-lean path.
    LoraRecompute(BaseQuant),
    Full,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Lora(BaseQuant::None),
        Mode::Lora(BaseQuant::Int8),
        Mode::Lora(BaseQuant::Nf4),
        Mode::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Lora(q) => q.as_str(),
            Mode::LoraRecompute(BaseQuant::None) => "none-recompute",
            Mode::LoraRecompute(BaseQuant::Int8) => "int8-recompute",
            Mode::LoraRecompute(BaseQuant::Nf4) => "nf4-recompute",
            Mode::Full => "full",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "full" => Mode::Full,
            other => match other.strip_suffix("-recompute") {
                Some(q) => Mode::LoraRecompute(q.parse()?),
                None => Mode::Lora(other.parse()?),
            },
        })
    }
}

/// Useful floating-point work of one step (recomputation not counted): matmuls of the forward pass
/// (projections, attention scores and values, LM head on the target positions), the input gradients
/// (the same again, attention twice), for full fine-tuning the weight gradients, and for LoRA its own
/// products (`lora`).
pub fn step_flops(
    config: &ModelConfig,
    linear_params: usize,
    batch: &[Sequence],
    full: bool,
    lora: Option<&LoraConfig>,
) -> f64 {
    let tokens: usize = batch.iter().map(|q| q.ids.len()).sum();
    let targets: usize = batch.iter().map(Sequence::targets).sum();
    let attention: f64 = batch
        .iter()
        .map(|q| 4.0 * (q.ids.len() * q.ids.len() * config.hidden_size) as f64)
        .sum::<f64>()
        * config.num_hidden_layers as f64;
    let linear = 2.0 * linear_params as f64 * tokens as f64;
    let head = 2.0 * (config.hidden_size * config.vocab_size * targets) as f64;
    let forward = linear + attention + head;
    let input_grads = linear + 2.0 * attention + head;
    let weight_grads = if full { linear + head } else { 0.0 };
    forward + input_grads + weight_grads + lora.map_or(0.0, |l| lora_flops(config, l, tokens))
}

/// LoRA's products over `tokens` rows: per adapted projection `[out, in]` and token, `2r·(in + out)`
/// forward (`x Aᵀ`, then `· Bᵀ`) and `4r·(in + out)` backward (`dy B`, `dyᵀ low`, `dlowᵀ x`, `dlow A`).
pub fn lora_flops(config: &ModelConfig, lora: &LoraConfig, tokens: usize) -> f64 {
    let per_layer: usize = lora
        .targets
        .iter()
        .map(|t| {
            let [out, inp] = t.shape(config);
            6 * lora.r * (inp + out)
        })
        .sum();
    let layers = lora
        .layers
        .as_ref()
        .map_or(config.num_hidden_layers, Vec::len);
    (per_layer * layers * tokens) as f64
}

/// Timed steps after the warm-up step.
pub const TIMED_STEPS: usize = 5;
/// Longest matmul window beside a step (seconds): long enough to average this VM's noise the way a step
/// does, short enough that full fine-tuning's long steps do not double the benchmark's time.
const MAX_WINDOW_S: f64 = 4.0;

/// One timed step and the matmul rate around it (the mean of the windows before and after it).
#[derive(Debug, Clone, Copy)]
struct Timed {
    step_s: f64,
    gflops: f64,
}

/// The back-to-back rate of `gemm` over a window as long as a step of `step_s` (at most
/// [`MAX_WINDOW_S`]).
fn window(gemm: Gemm, step_s: f64) -> f64 {
    super::gemm_gflops_sustained(gemm, step_s.min(MAX_WINDOW_S))
}

/// The child: load the base for `mode`, run a warm-up step and [`TIMED_STEPS`] timed ones (each with
/// the AdamW update), print one JSON line.
pub fn step(mode: Mode, batch: usize, seq: usize) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    let path = root.join(crate::commands::setup::DEFAULT_MODEL_PATH);
    let ck = Checkpoint::open(&path).context("opening the default model")?;
    let device = default_device();
    let quant = match mode {
        Mode::Lora(q) | Mode::LoraRecompute(q) => q,
        Mode::Full => BaseQuant::None,
    };
    let t = Instant::now();
    let mut model = ck.with_source(|src| QloraModel::load(src, &ck.config, quant, &device))?;
    let load_s = t.elapsed().as_secs_f64();
    model.step_path = StepPath::choose(!matches!(mode, Mode::LoraRecompute(_)), &device);
    // Training needs only the base built from the file: unmap the checkpoint.
    drop(ck);
    let rss_loaded = current_rss();
    let data = synthetic_batch(batch, seq, model.config.vocab_size);
    let opt = AdamW::default();
    let lora = (mode != Mode::Full).then(LoraConfig::default);
    let mut weights = match &lora {
        Some(config) => Weights::Lora(Adapter::init(config.clone(), &model.config, "bench", 42)?),
        None => Weights::Full,
    };
    let sizes = weights.sizes(&model);
    let mut adam = AdamState::new(&sizes);
    let dropout = Some(Dropout { p: 0.05, seed: 1 });
    let mut run_step = |model: &mut QloraModel| -> anyhow::Result<f64> {
        let (loss, grads) = weights.loss_and_grads(model, &data, dropout)?;
        let coefficients = opt.begin_step(&mut adam, 1e-5);
        weights.update(model, coefficients, &mut adam, &grads)?;
        Ok(loss.sum / loss.tokens.max(1) as f64)
    };
    // The reference: the faster of the project's two fp32 GEMMs on this machine (burst rates).
    let burn_burst = super::gemm_gflops(Gemm::Burn);
    let step_burst = super::gemm_gflops(Gemm::Step);
    let (gemm, burst) = if step_burst >= burn_burst {
        (Gemm::Step, step_burst)
    } else {
        (Gemm::Burn, burn_burst)
    };
    // The first step pays for fresh pages. Then each step is timed between two windows of that GEMM.
    let warm_up = Instant::now();
    run_step(&mut model)?;
    let mut before = window(gemm, warm_up.elapsed().as_secs_f64());
    let (mut timed, mut loss) = (Vec::with_capacity(TIMED_STEPS), 0.0);
    for _ in 0..TIMED_STEPS {
        let t = Instant::now();
        loss = run_step(&mut model)?;
        let step_s = t.elapsed().as_secs_f64();
        let after = window(gemm, step_s);
        timed.push(Timed {
            step_s,
            gflops: (before + after) / 2.0,
        });
        before = after;
    }
    let fp = model.footprint();
    let flops = step_flops(
        &model.config,
        fp.linear_params,
        &data,
        mode == Mode::Full,
        lora.as_ref(),
    );
    // A step's share of the rate around it is `flops / (step_s · gflops)`: order by the denominator.
    let mut by_share = timed.clone();
    by_share.sort_by(|a, b| (a.step_s * a.gflops).total_cmp(&(b.step_s * b.gflops)));
    let median = by_share[by_share.len() / 2];
    let peak = peak_rss();
    let trainable: usize = sizes.iter().sum();
    let row = StepRow {
        mode: mode.name().to_string(),
        batch,
        seq,
        linear_params: fp.linear_params,
        linear_bytes: fp.linear_bytes,
        bits_per_param: fp.bits_per_linear_param(),
        base_bytes: fp.total_bytes(),
        trainable,
        rss_loaded,
        peak_rss: peak,
        load_s,
        step_s: median.step_s,
        fastest_step_s: timed.iter().map(|t| t.step_s).fold(f64::INFINITY, f64::min),
        steps: timed.iter().map(|t| [t.step_s, t.gflops]).collect(),
        tokens: data.iter().map(|q| q.ids.len()).sum(),
        flops,
        loss,
        matmul_gflops: burst,
        matmul_sustained_gflops: Some(median.gflops),
        gemm: Some(gemm.name()),
        gemm_burst: Some([burn_burst, step_burst]),
    };
    println!("{}", serde_json::to_string(&row)?);
    Ok(())
}

/// What one `bench train-step` child measured: its JSON line, and a line of the pipeline's
/// `efficiency/steps.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRow {
    /// [`Mode::name`].
    pub mode: String,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Parameters of the base's linear projections.
    pub linear_params: usize,
    /// Bytes those take in the mode's format.
    pub linear_bytes: usize,
    /// `8 · linear_bytes / linear_params`.
    pub bits_per_param: f64,
    /// Resident bytes of the whole base.
    pub base_bytes: usize,
    /// Trainable parameters.
    pub trainable: usize,
    /// RSS after loading, bytes.
    pub rss_loaded: u64,
    /// Peak RSS, bytes.
    pub peak_rss: u64,
    /// Seconds to load the base.
    pub load_s: f64,
    /// The step with the median share of the sustained matmul rate around it.
    pub step_s: f64,
    /// The fastest timed step.
    pub fastest_step_s: f64,
    /// Every timed step: `[seconds, sustained GFLOP/s around it]`.
    #[serde(default)]
    pub steps: Vec<[f64; 2]>,
    /// Tokens per batch.
    pub tokens: usize,
    /// Useful FLOPs of one step.
    pub flops: f64,
    /// The last step's loss.
    pub loss: f64,
    /// Burst rate: the fastest single 1024³ product of 30, of the reference GEMM ([`StepRow::gemm`]).
    pub matmul_gflops: f64,
    /// The sustained rate around the median step (absent in runs written before it was measured).
    #[serde(default)]
    pub matmul_sustained_gflops: Option<f64>,
    /// The reference GEMM: the faster of Burn's and the step's own at 1024³ (absent in runs written
    /// before both were measured: Burn's then).
    #[serde(default)]
    pub gemm: Option<String>,
    /// Burst rates of Burn's GEMM and of the step's own, GFLOP/s.
    #[serde(default)]
    pub gemm_burst: Option<[f64; 2]>,
}

impl StepRow {
    /// The matmul rate a row is compared with: sustained where measured, else burst.
    pub fn rate(&self) -> f64 {
        self.matmul_sustained_gflops.unwrap_or(self.matmul_gflops)
    }
}

/// Runs `bench train-step` in a child process and returns its row.
pub fn child(mode: Mode, batch: usize, seq: usize) -> anyhow::Result<StepRow> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .args(["bench", "train-step", "--mode", mode.name()])
        .args(["--batch", &batch.to_string(), "--seq", &seq.to_string()])
        .output()
        .context("running the benchmark child")?;
    if !out.status.success() {
        bail!("{}: {}", mode.name(), String::from_utf8_lossy(&out.stderr));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).context("reading the benchmark child's output")
}

pub fn run() -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    crate::commands::setup::run(&root)?;
    let mut runs: Vec<(Mode, usize, usize)> = [(8, 128), (4, 64)]
        .into_iter()
        .flat_map(|(b, s)| Mode::ALL.map(|m| (m, b, s)))
        .collect();
    // The memory-lean path beside the default one, at the larger shape.
    runs.insert(3, (Mode::LoraRecompute(BaseQuant::Nf4), 8, 128));
    // Each child measures the matmul rate right after its steps (this VM's speed drifts over minutes), and
    // a row's share is of its own child's rate.
    let mut results = Vec::new();
    for (mode, batch, seq) in runs {
        eprintln!("[bench] {} {batch}x{seq}", mode.name());
        results.push((mode, batch, seq, child(mode, batch, seq)?));
    }
    println!("{}", super::cpu_line());
    println!(
        "training step of the default model (LoRA r 8 on all projections; full: every parameter), \
         incl. AdamW, {TIMED_STEPS} timed steps after a warm-up; matmul: the best fp32 GEMM found in the \
         same process (the faster at 1024³ of Burn's backend and the step's own), sustained = back to \
         back in windows as long as the step (at most {MAX_WINDOW_S} s) before and after it, burst = the \
         fastest single product of 30; each row: the step with the median share of the sustained rate \
         around it"
    );
    for (mode, batch, seq, v) in &results {
        if let (Some(gemm), Some([burn, step])) = (&v.gemm, v.gemm_burst) {
            println!(
                "  {} {batch}x{seq}: reference {gemm}; burst 1024³: {} {burn:.1}, {} {step:.1} GFLOP/s",
                mode.name(),
                Gemm::Burn.name(),
                Gemm::Step.name()
            );
        }
    }
    println!(
        "{:<14} {:>7} {:>12} {:>9} {:>10} {:>9} {:>10} {:>9} {:>11} {:>9} {:>9} {:>8}",
        "mode",
        "shape",
        "trainable",
        "step s",
        "tokens/s",
        "GFLOP/s",
        "sustained",
        "burst",
        "% of sust.",
        "% burst",
        "peak MB",
        "loss"
    );
    let mut nf4_peak = 0.0;
    for (mode, batch, seq, v) in results {
        let gflops = v.flops / v.step_s / 1e9;
        let (sustained, burst) = (v.rate(), v.matmul_gflops);
        println!(
            "{:<14} {:>7} {:>12} {:>9.2} {:>10.1} {:>9.1} {:>10.1} {:>9.1} {:>10.0}% {:>8.0}% {:>9.1} {:>8.4}",
            mode.name(),
            format!("{batch}x{seq}"),
            v.trainable,
            v.step_s,
            v.tokens as f64 / v.step_s,
            gflops,
            sustained,
            burst,
            100.0 * gflops / sustained,
            100.0 * gflops / burst,
            v.peak_rss as f64 / 1e6,
            v.loss,
        );
        if mode == Mode::Lora(BaseQuant::Nf4) && batch == 8 {
            nf4_peak = v.peak_rss as f64;
        }
    }
    println!(
        "targets: LoRA/QLoRA >= 70% of the sustained matmul rate; QLoRA-nf4 peak RSS at 8x128 = {:.2} GiB (target <= 1.5 GiB)",
        nf4_peak / (1u64 << 30) as f64
    );
    Ok(())
}
