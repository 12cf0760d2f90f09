//! `cargo xtask bench model`: throughput of the default model on this machine, every ratio measured in one
//! run: the backend's matmul GFLOP/s; prefill tokens/s and its share of that matmul rate; batch-1 and batch-8
//! decode tokens/s (timed in turns) with the weight bytes read per step against the DRAM read bandwidth
//! measured on a buffer of at least 4x the L3.

pub mod device;
pub mod eval;
pub mod qlora;
pub mod train;

use std::time::{Duration, Instant};

use anyhow::Context;
use burn::tensor::{Distribution, Tensor};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use supportlm_model::decode::DecodeState;
use supportlm_model::llama::{to_vec, PromptPath, StepInput};
use supportlm_model::{default_device, Model};

#[derive(Clone, Copy, ValueEnum)]
pub enum Suite {
    /// Model inference: matmul, prefill, decode, scoring.
    Model,
    /// The decode kernels alone: LM-head-sized Q4_1 products (49152 x 576, and 18432 x 1536 as wide as
    /// the down projection) per batch size, timed in turns, against the same product at batch 1.
    Kernels,
    /// Base memory per format and the peak RSS of one LoRA training step (none / int8 / nf4).
    Qlora,
    /// Task 1 scoring: items/s for 0-shot and 10-shot with the constrained rule, with and without
    /// prefix reuse.
    Eval,
    /// Training step per mode (LoRA on f32 / int8 / nf4 bases, full fine-tuning) at 8x128 and 4x64:
    /// tokens/s, peak RSS, share of the matmul rate.
    Train,
    /// One device's workloads in Burn tensor ops (`--device`, `--shape`): prefill, scoring batch, decode
    /// batch 1 and 16, a QLoRA NF4 step, each against that device's matmul rate.
    Device,
    /// (internal) one training step in this process, for `qlora` and `train`.
    #[value(hide = true)]
    TrainStep,
}

#[derive(Args)]
pub struct BenchArgs {
    suite: Suite,
    /// Items for the eval benchmark.
    #[arg(long, default_value_t = 40)]
    items: usize,
    /// Decode steps per decode measurement (`device`, `model --device`); timed training steps
    /// (`train --device`, at most 5).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Batch rows (qlora, device, train-step; `train --device`: only this shape, with `--seq`)
    /// [default: 8].
    #[arg(long)]
    batch: Option<usize>,
    /// Sequence length (as `--batch`) [default: 128].
    #[arg(long)]
    seq: Option<usize>,
    /// Mode for `train-step`: none, int8, nf4 (LoRA base formats) or full.
    #[arg(long, default_value = "nf4")]
    mode: String,
    /// Device for `device`, `model`, `train`, `eval`: cpu, wgpu[:N], cuda[:N] (xtask built with
    /// `--features wgpu` / `cuda`); for `model` and `train` a device other than the CPU runs the
    /// tensor-op paths a GPU takes (the CPU default: the host kernels).
    #[arg(long)]
    device: Option<String>,
    /// Model for `device`: `default` (the shipped SmolLM2) or `qwen2.5-1.5b` (random weights in its
    /// shapes).
    #[arg(long, default_value = "default")]
    shape: String,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (batch, seq) = (args.batch.unwrap_or(8), args.seq.unwrap_or(128));
    let device_bench = || device::DeviceBench {
        device: args.device.as_deref(),
        shape: &args.shape,
        batch,
        seq,
        steps: args.steps,
    };
    // `--device` other than the CPU: the tensor-op paths a GPU runs, against that device's matmul.
    let on_device = supportlm_model::device::DeviceSpec::choose(args.device.as_deref())?;
    let on_device = !on_device.is_cpu();
    match args.suite {
        Suite::Model if on_device => device::model(device_bench()),
        Suite::Model => model(&args),
        Suite::Kernels => kernels(),
        Suite::Qlora => qlora::run(batch, seq),
        Suite::Eval => eval::run(args.items, args.device.as_deref()),
        Suite::Train if on_device => {
            let shapes = if args.batch.is_some() || args.seq.is_some() {
                vec![(batch, seq)]
            } else {
                vec![(8, 128), (32, 256)]
            };
            device::train(device_bench(), &shapes)
        }
        Suite::Train => train::run(),
        Suite::Device => device::run(device_bench()),
        Suite::TrainStep => train::step(train::Mode::parse(&args.mode)?, batch, seq),
    }
}

/// Best time of `reps` runs of `f`.
fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let out = f();
        best = best.min(t.elapsed());
        last = Some(out);
    }
    (best, last.expect("reps > 0"))
}

/// A measurement for [`fastest_in_turns`].
type Run<'a> = Box<dyn FnMut() -> anyhow::Result<()> + 'a>;

/// The fastest time (seconds) of each of `runs`, timed in turns: per round, each run `reps` times in a
/// row, so that a drift of this machine's speed hits them alike and the ratios between them hold.
fn fastest_in_turns(rounds: usize, reps: usize, runs: &mut [Run<'_>]) -> anyhow::Result<Vec<f64>> {
    let mut fastest = vec![f64::INFINITY; runs.len()];
    for _round in 0..rounds {
        for (run, best) in runs.iter_mut().zip(&mut fastest) {
            for _ in 0..reps {
                let t = Instant::now();
                run()?;
                *best = best.min(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(fastest)
}

/// Side of the square matmul both rates below time.
const MATMUL_N: usize = 1024;

/// One timed unit of the matmul rates: a product of two random `MATMUL_N`² matrices, read back (so
/// backends that run asynchronously finish it). Returns the product's FLOPs.
fn matmul_once() -> impl FnMut() -> f64 {
    let device = default_device();
    let n = MATMUL_N;
    let a = Tensor::<2>::random([n, n], Distribution::Default, &device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, &device);
    move || {
        let _ = to_vec(a.clone().matmul(b.clone()));
        2.0 * (n * n * n) as f64
    }
}

/// The fp32 GEMMs the project runs: Burn's CPU backend (the `gemm` crate: prefill, scoring) and the
/// host paths' own products (the training step, the prompt pass: faer's kernels on x86-64,
/// `supportlm_quant::gemm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemm {
    Burn,
    Step,
}

impl Gemm {
    pub fn name(self) -> String {
        match self {
            Gemm::Burn => "burn-flex (gemm crate)".into(),
            Gemm::Step => supportlm_quant::gemm::library().into(),
        }
    }
}

/// A seeded source of `len` values uniform in [-0.5, 0.5) per call (an LCG: operands for timing, no
/// statistics asked of them).
fn uniform(seed: u32) -> impl FnMut(usize) -> Vec<f32> {
    let mut state = seed;
    move |len| {
        (0..len)
            .map(|_| {
                state = lcg(state);
                (state >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }
}

/// The next state of the LCG of [`uniform`].
fn lcg(state: u32) -> u32 {
    state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223)
}

/// One timed unit of `gemm`'s rate: a `MATMUL_N`³ product. Returns its FLOPs.
fn product_once(gemm: Gemm) -> Box<dyn FnMut() -> f64> {
    match gemm {
        Gemm::Burn => Box::new(matmul_once()),
        Gemm::Step => {
            let n = MATMUL_N;
            let mut random = uniform(0x9e37_79b9);
            let (a, b, mut c) = (random(n * n), random(n * n), vec![0f32; n * n]);
            Box::new(move || {
                supportlm_quant::gemm::product(&mut c, &a, &b, (n, n, n));
                std::hint::black_box(&c);
                2.0 * (n * n * n) as f64
            })
        }
    }
}

/// `gemm`'s f32 rate (1024³), the fastest of 30 runs (about a second): on a shared machine a handful of
/// runs can all land in a slow moment.
pub fn gemm_gflops(gemm: Gemm) -> f64 {
    let (t, flops) = best(30, product_once(gemm));
    flops / t.as_secs_f64() / 1e9
}

/// The backend's (Burn's) f32 matmul rate, [`gemm_gflops`] of [`Gemm::Burn`].
pub fn matmul_gflops() -> f64 {
    gemm_gflops(Gemm::Burn)
}

/// `gemm`'s sustained f32 rate: 1024³ products back to back for at least `window` seconds (at least
/// one product), over the whole window. Single products on a shared VM vary widely from one to the next,
/// so the fastest of 30 single runs ([`gemm_gflops`], the burst rate) sits above what any computation
/// lasting a second or more sustains; beside a timed training step, a window of the step's length
/// compares like with like.
pub fn gemm_gflops_sustained(gemm: Gemm, window: f64) -> f64 {
    let mut product = product_once(gemm);
    let (mut flops, t) = (0.0, Instant::now());
    while flops == 0.0 || t.elapsed().as_secs_f64() < window {
        flops += product();
    }
    flops / t.elapsed().as_secs_f64() / 1e9
}

/// `(m, k, n)` of one decoder layer's products at `tokens` tokens: as the Burn model runs them (q, k,
/// v, o, gate, up, down) or with the projections that read one input stacked (q/k/v, o, gate/up, down).
fn prefill_shapes(
    tokens: usize,
    c: &supportlm_model::config::ModelConfig,
    stacked: bool,
) -> Vec<Shape> {
    let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim(),
        c.kv_heads() * c.head_dim(),
    );
    if stacked {
        vec![
            (tokens, hidden, q + 2 * kv),
            (tokens, q, hidden),
            (tokens, hidden, 2 * ffn),
            (tokens, ffn, hidden),
        ]
    } else {
        vec![
            (tokens, hidden, q),
            (tokens, hidden, kv),
            (tokens, hidden, kv),
            (tokens, q, hidden),
            (tokens, hidden, ffn),
            (tokens, hidden, ffn),
            (tokens, ffn, hidden),
        ]
    }
}

/// A product's `(m, k, n)`: `[m, k] · [k, n]`.
type Shape = (usize, usize, usize);

/// One run of the products `shapes` (random operands made once) through `gemm`; Burn's
/// right operands are `[n, k]` weights used transposed, as its linear layers hold them.
fn products_once(gemm: Gemm, shapes: &[Shape]) -> Run<'static> {
    let mut random = uniform(0x2545_f491);
    let operands: Vec<(Vec<f32>, Vec<f32>, Shape)> = shapes
        .iter()
        .map(|&(m, k, n)| (random(m * k), random(k * n), (m, k, n)))
        .collect();
    match gemm {
        Gemm::Burn => {
            let device = default_device();
            let tensors: Vec<(Tensor<2>, Tensor<2>)> = operands
                .into_iter()
                .map(|(a, b, (m, k, n))| {
                    (
                        Tensor::<1>::from_floats(a.as_slice(), &device).reshape([m, k]),
                        Tensor::<1>::from_floats(b.as_slice(), &device).reshape([n, k]),
                    )
                })
                .collect();
            Box::new(move || {
                for (a, w) in &tensors {
                    to_vec(a.clone().matmul(w.clone().transpose()))?;
                }
                Ok(())
            })
        }
        Gemm::Step => {
            let mut outs: Vec<Vec<f32>> = operands
                .iter()
                .map(|(_, _, (m, _, n))| vec![0f32; m * n])
                .collect();
            Box::new(move || {
                for ((a, b, (m, k, n)), c) in operands.iter().zip(&mut outs) {
                    supportlm_quant::gemm::product(c, a, b, (*m, *n, *k));
                    std::hint::black_box(&c);
                }
                Ok(())
            })
        }
    }
}

/// The quantized decode kernels on their own: random Q4_1 matrices of the LM head's size (17.7 MB) in
/// two widths, SmolLM2's hidden size (576 columns, as the LM head and the q/k/v/o/gate/up projections)
/// and its FFN width (1536, the down projection: 8 vectors of it are 48 KiB, past a 32 KiB L1), times 1,
/// 2, 4 and 8 vectors, 5 rounds in turns, the fastest of each; tokens/s relative to batch 1 is what a
/// decode batch can gain at most (the model's step adds attention and norms per row).
fn kernels() -> anyhow::Result<()> {
    println!("{}", cpu_line());
    for (rows, cols) in [(49152usize, 576usize), (18432, 1536)] {
        kernels_at(rows, cols)?;
    }
    Ok(())
}

fn kernels_at(rows: usize, cols: usize) -> anyhow::Result<()> {
    use supportlm_quant::ggml::GgmlType;
    use supportlm_quant::kernels::QMatrix;
    let n_blocks = rows * cols / 32;
    let mut state = 0x2545_f491u32;
    let mut bytes: Vec<u8> = (0..n_blocks * 20)
        .map(|_| {
            state = lcg(state);
            (state >> 24) as u8
        })
        .collect();
    for block in bytes.chunks_exact_mut(20) {
        // f16 scale 0.01 and offset -0.05 (little-endian bits), random codes.
        block[..4].copy_from_slice(&[0x1f, 0x21, 0x66, 0xaa]);
    }
    let m = QMatrix::from_ggml(GgmlType::Q4_1, &bytes, rows, cols);
    let xs: Vec<Vec<f32>> = (0..8)
        .map(|b| {
            (0..cols)
                .map(|k| ((k * 7 + b) % 13) as f32 * 0.1 - 0.6)
                .collect()
        })
        .collect();
    let batches = [1usize, 2, 4, 8];
    let mut runs: Vec<Run> = batches
        .iter()
        .map(|&b| {
            let refs: Vec<&[f32]> = xs[..b].iter().map(Vec::as_slice).collect();
            let mut ys = vec![0f32; rows * b];
            let m = &m;
            Box::new(move || {
                m.matvecs(&refs, &mut ys);
                Ok(())
            }) as Run
        })
        .collect();
    let fastest = fastest_in_turns(5, 5, &mut runs)?;
    for (&b, &t) in batches.iter().zip(&fastest) {
        println!(
            "Q4_1 {rows}x{cols} ({:.1} MB) x {b} vector(s): {:.2} ms, {:.1} GB/s of weights, {:.1} GFLOP/s, {:.2}x batch 1's vectors/s",
            m.size_bytes() as f64 / 1e6,
            t * 1e3,
            m.size_bytes() as f64 / t / 1e9,
            2.0 * (rows * cols * b) as f64 / t / 1e9,
            b as f64 * fastest[0] / t
        );
    }
    Ok(())
}

/// The CPU's model name, SIMD features, L3 size and the kernel level that runs, so figures from
/// different machines can be told apart.
pub fn cpu_line() -> String {
    use supportlm_quant::cpu::{simd, CpuFeatures};
    let f = CpuFeatures::detect();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let l3 = supportlm_quant::cpu::l3_bytes()
        .map(|b| format!("{} MiB", b as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "unknown".into());
    let yes = |b: bool| if b { "yes" } else { "no" };
    format!(
        "cpu: {model}; AVX2 {}, FMA {}, F16C {}, AVX-512F {}; L3 {l3}; kernels: {} (SUPPORTLM_SIMD caps it)",
        yes(f.avx2),
        yes(f.fma),
        yes(f.f16c),
        yes(f.avx512f),
        simd().as_str()
    )
}

/// Bytes copied per second by a memcpy of a buffer of `bytes`, split across the rayon threads.
fn memcpy_gbs(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let half = bytes / rayon::current_num_threads().max(1);
    let (t, _) = best(5, || {
        dst.par_chunks_mut(half)
            .zip(src.par_chunks(half))
            .for_each(|(d, s)| d.copy_from_slice(s));
        dst[bytes - 1]
    });
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn model(args: &BenchArgs) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    crate::commands::setup::run(&root)?;
    let path = root.join(crate::commands::setup::DEFAULT_MODEL_PATH);
    let device = default_device();
    let model = Model::load(&path, &device).context("loading the default model")?;
    let c = model.llama.config.clone();
    let decode = model.decode_weights()?;
    println!(
        "machine: {} threads (rayon), model {}",
        rayon::current_num_threads(),
        path.display()
    );
    println!("{}", cpu_line());

    let gemm = matmul_gflops();
    println!("matmul 1024x1024x1024 f32 (burn-flex): {gemm:.1} GFLOP/s");

    // Prefill: FLOPs of the linear layers for every token, attention, and the LM head for the last token.
    let n = 128;
    let prompt: Vec<u32> = (0..n as u32).map(|i| 1000 + (i * 37) % 20000).collect();
    let d = c.head_dim();
    let linear_params = c.num_hidden_layers
        * (c.hidden_size * (c.num_attention_heads * d + 2 * c.kv_heads() * d)
            + c.num_attention_heads * d * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size);
    let attn_flops = c.num_hidden_layers * c.num_attention_heads * d * 2 * n * (n + 1); // QK^T and PV, causal
    let flops = 2.0 * (linear_params * n) as f64
        + attn_flops as f64
        + 2.0 * (c.vocab_size * c.hidden_size) as f64;
    // The host path (what runs on the CPU) and the tensor ops it replaced, timed in turns.
    let paths = [
        (PromptPath::Host, "host path"),
        (PromptPath::Tensors, "Burn tensor ops"),
    ];
    let mut runs: Vec<Run> = paths
        .iter()
        .map(|&(path, _)| {
            let mut llama = model.llama.clone();
            llama.prompt_path = path;
            let input = StepInput::dense(vec![prompt.clone()]);
            Box::new(move || {
                let mut cache = llama.new_cache(1);
                to_vec(llama.forward_last(&input, &mut cache)?)?;
                Ok(())
            }) as Run
        })
        .collect();
    let fastest = fastest_in_turns(5, 1, &mut runs)?;
    for ((_, how), t) in paths.iter().zip(fastest) {
        let prefill_gflops = flops / t / 1e9;
        println!(
            "prefill {n} tokens ({how}): {:.0} tokens/s, {prefill_gflops:.1} GFLOP/s effective = {:.0}% of matmul (target >= 70%)",
            n as f64 / t,
            100.0 * prefill_gflops / gemm
        );
    }

    // The ceiling of prefill's products: its linear layers' products alone (one layer's at 128
    // tokens), through Burn as the tensor path runs them and stacked, and stacked through the host
    // paths' GEMM (`supportlm_quant::gemm`). What the products miss of the matmul rate, no fusion of
    // the rest recovers.
    let sets = [
        (Gemm::Burn, false, "as the tensor path runs them"),
        (Gemm::Burn, true, "q/k/v and gate/up stacked"),
        (Gemm::Step, true, "q/k/v and gate/up stacked"),
    ];
    let (mut runs, flops): (Vec<Run>, Vec<f64>) = sets
        .iter()
        .map(|&(g, stacked, _)| {
            let shapes = prefill_shapes(n, &c, stacked);
            let flops: f64 = shapes
                .iter()
                .map(|&(m, k, w)| 2.0 * (m * k * w) as f64)
                .sum();
            (products_once(g, &shapes), flops)
        })
        .unzip();
    let fastest = fastest_in_turns(10, 1, &mut runs)?;
    for ((g, _, how), (flops, t)) in sets.iter().zip(flops.into_iter().zip(fastest)) {
        let rate = flops / t / 1e9;
        println!(
            "prefill's linear products alone ({n} tokens, one layer's, {how}): {} {rate:.1} GFLOP/s = {:.0}% of matmul",
            g.name(),
            100.0 * rate / gemm
        );
    }

    // Decode reads every weight once per step: its bound is DRAM read bandwidth, measured on a buffer
    // at least 4x the L3 (so it cannot be served from cache) and at least 1 GiB.
    let weight_bytes = decode.bytes_per_step();
    let l3 = supportlm_quant::cpu::l3_bytes();
    let probe = (4 * l3.unwrap_or(0)).max(1 << 30);
    let read = supportlm_quant::cpu::read_bandwidth(probe, 5) / 1e9;
    let copy_same = memcpy_gbs(weight_bytes);
    println!(
        "memory read ({} threads): {read:.1} GB/s over {:.0} MiB ({}); memcpy {copy_same:.1} GB/s over {:.0} MB (the weights' size)",
        rayon::current_num_threads(),
        probe as f64 / (1 << 20) as f64,
        match l3 {
            Some(b) => format!("4x the {:.0} MiB L3", b as f64 / (1 << 20) as f64),
            None => "L3 size unknown".into(),
        },
        weight_bytes as f64 / 1e6
    );

    // Batch 1 and batch 8 timed in turns (3 rounds, best of each) so that the ratio between them is not
    // a drift of this machine's speed between two measurements.
    let batches = [1usize, 8];
    let mut states = Vec::new();
    for &batch in &batches {
        let prompts: Vec<Vec<u32>> = (0..batch).map(|b| prompt[..16 + b].to_vec()).collect();
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let input = StepInput {
            tokens: prompts
                .iter()
                .map(|p| [vec![2; len - p.len()], p.clone()].concat())
                .collect(),
            valid: prompts
                .iter()
                .map(|p| [vec![false; len - p.len()], vec![true; p.len()]].concat())
                .collect(),
        };
        let mut cache = model.llama.new_cache(batch);
        model.llama.forward_last(&input, &mut cache)?;
        states.push(DecodeState::from_cache(&cache, &c)?);
    }
    let decode = &decode;
    let mut runs: Vec<Run> = batches
        .iter()
        .zip(states)
        .map(|(&batch, state0)| {
            Box::new(move || {
                let mut state = state0.clone();
                let mut tokens = vec![100u32; batch];
                for _ in 0..args.steps {
                    let logits = decode.step(&tokens, &vec![true; batch], &mut state)?;
                    tokens = logits
                        .iter()
                        .map(|l| supportlm_model::sampling::argmax(l) as u32)
                        .collect();
                }
                Ok(())
            }) as Run
        })
        .collect();
    let fastest = fastest_in_turns(3, 1, &mut runs)?;
    let tokens_per_s: Vec<f64> = batches
        .iter()
        .zip(&fastest)
        .map(|(&b, t)| (args.steps * b) as f64 / t)
        .collect();
    for (&batch, &tps) in batches.iter().zip(&tokens_per_s) {
        let gbs = weight_bytes as f64 * tps / batch as f64 / 1e9;
        let target = if batch == 1 {
            " (target for batch 1: >= 40%)"
        } else {
            ""
        };
        println!(
            "decode batch {batch}: {tps:.1} tokens/s; {:.1} MB of weights read per step ({:.1} MB per token) -> {gbs:.1} GB/s = {:.0}% of the memory read bandwidth{target}",
            weight_bytes as f64 / 1e6,
            weight_bytes as f64 / 1e6 / batch as f64,
            100.0 * gbs / read,
        );
    }
    println!(
        "decode batch 8 / batch 1: {:.2}x the tokens/s (target >= 3x)",
        tokens_per_s[1] / tokens_per_s[0]
    );

    println!("(label scoring with and without prefix reuse: `cargo xtask bench eval`)");
    Ok(())
}
