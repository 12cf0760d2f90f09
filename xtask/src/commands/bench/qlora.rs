//! `cargo xtask bench qlora`: per base format (none / int8 / nf4), the frozen base's resident bytes and
//! bits per parameter, and the peak RSS and time of a LoRA training step (peak over two steps, time of
//! the second; batch 8 x 128 tokens by default), with every layer's activations kept (the default) and
//! with each layer recomputed in backward (`store_activations = false`, the memory-lean path). Each
//! run is its own child process ([`super::train::step`]) so that peaks do not mix.

use supportlm_train::BaseQuant;

use super::train::{child, Mode};

pub fn run(batch: usize, seq: usize) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    crate::commands::setup::run(&root)?;
    println!(
        "one LoRA step (r 8, all projections) at batch {batch} x {seq} tokens, default model:"
    );
    println!(
        "{:<15} {:>9} {:>10} {:>10} {:>12} {:>8} {:>8}",
        "base", "base MB", "bits/param", "linear MB", "peak RSS MB", "step s", "loss"
    );
    let mut peaks = Vec::new();
    for mode in BaseQuant::ALL
        .map(Mode::Lora)
        .into_iter()
        .chain(BaseQuant::ALL.map(Mode::LoraRecompute))
    {
        let v = child(mode, batch, seq)?;
        let mb = |bytes: f64| bytes / 1e6;
        println!(
            "{:<15} {:>9.1} {:>10.3} {:>10.1} {:>12.1} {:>8.2} {:>8.4}",
            mode.name(),
            mb(v.base_bytes as f64),
            v.bits_per_param,
            mb(v.linear_bytes as f64),
            mb(v.peak_rss as f64),
            v.step_s,
            v.loss,
        );
        peaks.push((mode, mb(v.peak_rss as f64)));
    }
    let peak = |m: Mode| peaks.iter().find(|(x, _)| *x == m).map_or(0.0, |p| p.1);
    for (what, wrap) in [
        ("activations kept", Mode::Lora as fn(BaseQuant) -> Mode),
        ("layers recomputed", Mode::LoraRecompute),
    ] {
        println!(
            "peak RSS ratio, {what}: nf4 / none = {:.2}, int8 / none = {:.2} (target nf4 <= 0.5)",
            peak(wrap(BaseQuant::Nf4)) / peak(wrap(BaseQuant::None)),
            peak(wrap(BaseQuant::Int8)) / peak(wrap(BaseQuant::None))
        );
    }
    Ok(())
}
