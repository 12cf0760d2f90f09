//! `cargo xtask bench device --device D [--shape default|qwen2.5-1.5b]`: the model's workloads on one
//! device in Burn tensor ops (the path `--device wgpu|cuda` takes; on `cpu` the same ops on burn-flex,
//! not the host kernels `bench model` times), each as a share of that device's f32 matmul rate measured
//! in the same run: prefill, scoring-sized batches, decoding at batch 1 and 16 with the KV cache on the
//! device (greedy ids read back), and one QLoRA NF4 training step. `--shape qwen2.5-1.5b` builds random
//! weights in Qwen2.5-1.5B-Instruct's shapes (nothing to download).
//!
//! `bench model --device D` runs the inference half and `bench train --device D` the training table
//! (every mode at 8 x 128 and 32 x 256, or `--batch` x `--seq`) for a device other than the CPU.

use std::time::Instant;

use anyhow::Context;
use burn::tensor::{Distribution, Tensor};
use supportlm_model::config::ModelConfig;
use supportlm_model::device::DeviceSpec;
use supportlm_model::llama::{to_vec, Llama, StepInput};
use supportlm_model::loader::{load_llama_as, TensorSource};
use supportlm_model::lora::{Adapter, LoraConfig};
use supportlm_model::model::Checkpoint;
use supportlm_model::{tiny, BaseQuant, Device};
use supportlm_train::optim::{clip_global_norm_on_device, AdamState, AdamW};
use supportlm_train::qlora::{Dropout, QloraModel, StepPath};
use supportlm_train::trainer::Weights as TrainWeights;

use super::train::{step_flops, synthetic_batch, Mode};

/// What `bench device` runs.
pub struct DeviceBench<'a> {
    pub device: Option<&'a str>,
    pub shape: &'a str,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
}

/// `n`³ f32 products on `device`, read back, the best of `reps`: GFLOP/s.
fn matmul_gflops(device: &Device, n: usize, reps: usize) -> anyhow::Result<f64> {
    let a = Tensor::<2>::random([n, n], Distribution::Default, device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, device);
    to_vec(a.clone().matmul(b.clone()).sum())?; // compile the kernels
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        to_vec(a.clone().matmul(b.clone()).sum())?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// Where the benchmarked model's weights come from.
enum Weights {
    Random(tiny::RandomSource),
    File(Box<Checkpoint>),
}

impl Weights {
    fn with_source<R>(&self, f: impl FnOnce(&dyn TensorSource) -> R) -> R {
        match self {
            Weights::Random(src) => f(src),
            Weights::File(ck) => ck.with_source(f),
        }
    }
}

/// The model's configuration, its weights and a line saying what it is.
fn model_source(shape: &str) -> anyhow::Result<(ModelConfig, Weights, String)> {
    match shape {
        "qwen2.5-1.5b" => {
            let config = tiny::qwen2_5_1_5b();
            let source = tiny::RandomSource::new(&config, 7);
            Ok((
                config,
                Weights::Random(source),
                "Qwen2.5-1.5B shapes, random weights".into(),
            ))
        }
        "default" => {
            let root = crate::utils::workspace_root();
            crate::commands::setup::run(&root)?;
            let path = root.join(crate::commands::setup::DEFAULT_MODEL_PATH);
            let ck = Checkpoint::open(&path)?;
            Ok((
                ck.config.clone(),
                Weights::File(Box::new(ck)),
                path.display().to_string(),
            ))
        }
        other => anyhow::bail!("--shape {other}: expected default or qwen2.5-1.5b"),
    }
}

/// Forward FLOPs per token of the linear layers and the LM head (attention's own products left out).
fn flops_per_token(config: &ModelConfig) -> f64 {
    2.0 * (config.num_params() as f64 - (config.vocab_size * config.hidden_size) as f64
        + if config.tie_word_embeddings {
            (config.vocab_size * config.hidden_size) as f64
        } else {
            0.0
        })
}

/// Greedy decoding of `steps` tokens for `batch` rows after a 16-token prompt, KV cache on the device,
/// the ids read back each step: tokens/s.
fn decode_tps(llama: &Llama, batch: usize, steps: usize) -> anyhow::Result<f64> {
    let prompt: Vec<Vec<u32>> = (0..batch)
        .map(|r| {
            (0..16)
                .map(|i| 10 + ((r * 31 + i * 7) % 500) as u32)
                .collect()
        })
        .collect();
    let mut cache = llama.new_cache(batch);
    let mut logits = llama.forward_last(&StepInput::dense(prompt), &mut cache)?;
    let t = Instant::now();
    for _ in 0..steps {
        let ids = logits
            .argmax(1)
            .try_into_data()
            .map_err(|e| anyhow::anyhow!("reading token ids back: {e:?}"))?
            .convert::<i64>();
        let ids: Vec<u32> = ids
            .try_into_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let step = StepInput::dense(ids.into_iter().map(|i| vec![i]).collect());
        logits = llama.forward_last(&step, &mut cache)?;
    }
    to_vec(logits.sum())?;
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

/// The device, its matmul rate (printed) and the model to measure.
struct Setup {
    device: Device,
    gflops: f64,
    config: ModelConfig,
    source: Weights,
}

fn setup(args: &DeviceBench) -> anyhow::Result<Setup> {
    let spec = DeviceSpec::choose(args.device)?;
    let device = spec.open()?;
    let n = 1024;
    let gflops = matmul_gflops(&device, n, 5)?;
    println!("device {spec}: matmul {n}^3 f32 {gflops:.1} GFLOP/s (the reference below)");
    let (config, source, what) = model_source(args.shape)?;
    println!(
        "model: {what} ({}M parameters)",
        config.num_params() / 1_000_000
    );
    Ok(Setup {
        device,
        gflops,
        config,
        source,
    })
}

/// `bench device`: inference, then one QLoRA step at `--batch` x `--seq`.
pub fn run(args: DeviceBench) -> anyhow::Result<()> {
    let setup = setup(&args)?;
    inference(&setup, &args)?;
    training(
        &setup,
        &[Mode::Lora(BaseQuant::Nf4)],
        &[(args.batch, args.seq)],
        1,
    )
}

/// `bench model --device D`: prefill, a scoring-sized batch, decoding at batch 1 and 16.
pub fn model(args: DeviceBench) -> anyhow::Result<()> {
    let setup = setup(&args)?;
    inference(&setup, &args)
}

/// `bench train --device D`: a training step per mode (LoRA on f32 / int8 / NF4 bases, full
/// fine-tuning) at each shape, as the trainer runs it there (factors or parameters, gradients and AdamW
/// state on the device), `steps` timed steps after a warm-up.
pub fn train(args: DeviceBench, shapes: &[(usize, usize)]) -> anyhow::Result<()> {
    let setup = setup(&args)?;
    training(&setup, &Mode::ALL, shapes, args.steps.clamp(1, 5))
}

fn inference(setup: &Setup, args: &DeviceBench) -> anyhow::Result<()> {
    let Setup {
        device,
        gflops,
        config,
        source,
    } = setup;
    let t = Instant::now();
    let llama = source
        .with_source(|src| load_llama_as(src, config, BaseQuant::None, device))
        .context("loading the model onto the device")?;
    println!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    let per_token = flops_per_token(config);
    let share = |tps: f64| 100.0 * tps * per_token / 1e9 / gflops;

    let (b, s) = (args.batch, args.seq);
    let rows = token_rows(b, s);
    let timed = |label: &str, rows: &[Vec<u32>]| -> anyhow::Result<()> {
        let input = StepInput::dense(rows.to_vec());
        to_vec(
            llama
                .forward_last(&input, &mut llama.new_cache(rows.len()))?
                .sum(),
        )?;
        let t = Instant::now();
        to_vec(
            llama
                .forward_last(&input, &mut llama.new_cache(rows.len()))?
                .sum(),
        )?;
        let tps = (rows.len() * rows[0].len()) as f64 / t.elapsed().as_secs_f64();
        println!("{label}: {tps:.0} tokens/s = {:.0}% of matmul", share(tps));
        Ok(())
    };
    timed(&format!("prefill 1 x {s}"), &rows[..1])?;
    timed(&format!("scoring-sized batch {b} x {s}"), &rows)?;
    for batch in [1, 16] {
        let tps = decode_tps(&llama, batch, args.steps)?;
        println!(
            "decode batch {batch}: {tps:.1} tokens/s = {:.1}% of matmul",
            share(tps)
        );
    }
    Ok(())
}

/// `b` rows of `s` deterministic token ids.
fn token_rows(b: usize, s: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|r| {
            (0..s)
                .map(|i| 10 + ((r * 17 + i * 13) % 900) as u32)
                .collect()
        })
        .collect()
}

/// Training steps on the device per mode and shape: the trainer's resident step (loss and gradients,
/// global-norm clipping, AdamW), `steps` of them back to back after a warm-up, timed to the end of the
/// last update.
fn training(
    setup: &Setup,
    modes: &[Mode],
    shapes: &[(usize, usize)],
    steps: usize,
) -> anyhow::Result<()> {
    let Setup {
        device,
        gflops,
        config,
        source,
    } = setup;
    println!(
        "training step (LoRA r 8 on every projection, dropout 0.05; full: every parameter), incl. \
         clipping and AdamW, mean of {steps} after a warm-up:"
    );
    println!(
        "{:<8} {:>8} {:>12} {:>9} {:>10} {:>9} {:>10}",
        "mode", "shape", "trainable", "step s", "tokens/s", "GFLOP/s", "% matmul"
    );
    for &mode in modes {
        let quant = match mode {
            Mode::Lora(q) | Mode::LoraRecompute(q) => q,
            Mode::Full => BaseQuant::None,
        };
        let mut model = source
            .with_source(|src| QloraModel::load(src, config, quant, device))
            .with_context(|| format!("loading the {} base onto the device", mode.name()))?;
        model.step_path = StepPath::choose(!matches!(mode, Mode::LoraRecompute(_)), device);
        let lora = (mode != Mode::Full).then(|| LoraConfig {
            r: 8,
            alpha: 16.0,
            ..Default::default()
        });
        for &(b, s) in shapes {
            let data = synthetic_batch(b, s, config.vocab_size);
            let weights = match &lora {
                Some(l) => TrainWeights::Lora(Adapter::init(l.clone(), config, "bench", 1)?),
                None => TrainWeights::Full,
            };
            let sizes = weights.sizes(&model);
            let mut adam = AdamState::new(&sizes);
            let trainable: usize = sizes.iter().sum();
            let mut weights = weights.resident(&model, &adam)?;
            let opt = AdamW::default();
            let dropout = Some(Dropout { p: 0.05, seed: 1 });
            let mut step = |model: &mut QloraModel| -> anyhow::Result<()> {
                let (_, grads) = weights.device_loss_and_grads(model, &data, dropout)?;
                let (grads, _) = clip_global_norm_on_device(grads, 1.0)?;
                weights.update_on_device(model, opt.begin_step(&mut adam, 1e-5), grads)?;
                Ok(())
            };
            step(&mut model)?;
            let t = Instant::now();
            for _ in 0..steps {
                step(&mut model)?;
            }
            weights.wait_for_device(&model)?;
            let step_s = t.elapsed().as_secs_f64() / steps as f64;
            let fp = model.footprint();
            let flops = step_flops(
                config,
                fp.linear_params,
                &data,
                mode == Mode::Full,
                lora.as_ref(),
            );
            let rate = flops / step_s / 1e9;
            println!(
                "{:<8} {:>8} {:>12} {:>9.2} {:>10.1} {:>9.1} {:>9.0}%",
                mode.name(),
                format!("{b}x{s}"),
                trainable,
                step_s,
                (b * s) as f64 / step_s,
                rate,
                100.0 * rate / gflops
            );
        }
    }
    Ok(())
}
