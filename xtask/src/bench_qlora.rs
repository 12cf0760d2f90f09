//! `cargo xtask bench qlora`: per base format (none / int8 / nf4), the frozen base's resident bytes and
//! bits per parameter, and the peak RSS and time of a LoRA training step (peak over two steps, time of
//! the second; batch 8 x 128 tokens by default). Each format runs in its own child process
//! ([`crate::bench_train::step`]) so that peaks do not mix.

use supportlm_model::base_quant::BaseQuant;

use crate::bench_train::{child, Mode};

pub fn run(batch: usize, seq: usize) -> anyhow::Result<()> {
    let root = crate::pipeline::workspace_root();
    crate::setup::run(&root)?;
    println!(
        "one LoRA step (r 8, all projections) at batch {batch} x {seq} tokens, default model:"
    );
    println!(
        "{:<6} {:>12} {:>10} {:>14} {:>14} {:>10} {:>8}",
        "base", "base MB", "bits/param", "linear MB", "peak RSS MB", "step s", "loss"
    );
    let mut peaks = Vec::new();
    for quant in BaseQuant::ALL {
        let v = child(Mode::Lora(quant), batch, seq)?;
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
