//! `cargo xtask bench qlora`: per base format (none / int8 / nf4), the frozen base's resident bytes and
//! bits per parameter, and the peak RSS and time of a LoRA training step (peak over two steps, time of the second) (batch 8 x 128 tokens by
//! default). Each format runs in its own child process so that peaks do not mix.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use supportlm_model::base_quant::BaseQuant;
use supportlm_model::default_device;
use supportlm_model::lora::{Adapter, LoraConfig};
use supportlm_model::model::Checkpoint;
use supportlm_model::qlora::{Dropout, QloraModel, Sequence};

/// `VmHWM` (peak resident set) and `VmRSS` of this process, in bytes.
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

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

/// The child: load the base in `quant`, run one step, print one JSON line.
pub fn step(quant: BaseQuant, batch: usize, seq: usize) -> anyhow::Result<()> {
    let root = crate::pipeline::workspace_root();
    let path = root.join(crate::setup::DEFAULT_MODEL.dest);
    let ck = Checkpoint::open(&path).context("opening the default model")?;
    let device = default_device();
    let t = Instant::now();
    let model = ck.with_source(|src| QloraModel::load(src, &ck.config, quant, &device))?;
    let load_s = t.elapsed().as_secs_f64();
    // Training needs only the base built from the file: unmap the checkpoint.
    drop(ck);
    let (_, rss_loaded) = rss();
    let adapter = Adapter::init(LoraConfig::default(), &model.config, "bench", 42)?;
    let data = synthetic_batch(batch, seq, model.config.vocab_size);
    let dropout = Some(Dropout { p: 0.05, seed: 1 });
    model.loss(Some(&adapter), &data)?;
    // The first step pays for fresh pages; time the second.
    model.loss_and_grads(&adapter, &data, dropout)?;
    let t = Instant::now();
    let out = model.loss_and_grads(&adapter, &data, dropout)?;
    let step_s = t.elapsed().as_secs_f64();
    let (peak, _) = rss();
    let fp = model.footprint();
    println!(
        "{}",
        serde_json::json!({
            "quant": quant.as_str(),
            "linear_params": fp.linear_params,
            "linear_bytes": fp.linear_bytes,
            "bits_per_param": fp.bits_per_linear_param(),
            "base_bytes": fp.total_bytes(),
            "trainable": adapter.num_params(),
            "rss_loaded": rss_loaded,
            "peak_rss": peak,
            "load_s": load_s,
            "step_s": step_s,
            "loss": out.loss.sum / out.loss.tokens.max(1) as f64,
        })
    );
    Ok(())
}

pub fn run(batch: usize, seq: usize) -> anyhow::Result<()> {
    let root = crate::pipeline::workspace_root();
    crate::setup::run(&root)?;
    let exe = std::env::current_exe()?;
    println!(
        "one LoRA step (r 8, all projections) at batch {batch} x {seq} tokens, default model:"
    );
    println!(
        "{:<6} {:>12} {:>10} {:>14} {:>14} {:>10} {:>8}",
        "base", "base MB", "bits/param", "linear MB", "peak RSS MB", "step s", "loss"
    );
    let mut peaks = Vec::new();
    for quant in BaseQuant::ALL {
        let out = Command::new(&exe)
            .args(["bench", "qlora-step", "--quant", quant.as_str()])
            .args(["--batch", &batch.to_string(), "--seq", &seq.to_string()])
            .output()
            .context("running the benchmark child")?;
        if !out.status.success() {
            bail!("{quant}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim()).context("child output")?;
        let mb = |k: &str| v[k].as_f64().unwrap_or(0.0) / 1e6;
        println!(
            "{:<6} {:>12.1} {:>10.3} {:>14.1} {:>14.1} {:>10.2} {:>8.4}",
            quant.as_str(),
            mb("base_bytes"),
            v["bits_per_param"].as_f64().unwrap_or(0.0),
            mb("linear_bytes"),
            mb("peak_rss"),
            v["step_s"].as_f64().unwrap_or(0.0),
            v["loss"].as_f64().unwrap_or(0.0),
        );
        peaks.push((quant, mb("peak_rss")));
    }
    let peak = |q: BaseQuant| peaks.iter().find(|(x, _)| *x == q).map_or(0.0, |p| p.1);
    println!(
        "peak RSS ratio nf4 / none = {:.2} (target <= 0.5); int8 / none = {:.2}",
        peak(BaseQuant::Nf4) / peak(BaseQuant::None),
        peak(BaseQuant::Int8) / peak(BaseQuant::None)
    );
    Ok(())
}
