//! What several subcommands share: the default model's path, the `--method` argument, loading a model
//! (with an adapter) and the evaluation splits, and the seeded item sample. Subcommands import this
//! module and never each other.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context};
use clap::ValueEnum;
use supportlm_data::{load_csv, shipped, split, Record, SplitConfig, SplitSet, Task};
use supportlm_model::device::DeviceSpec;
use supportlm_model::{Device, Model};
use supportlm_prompting::Method;

/// The default model, put in place by `cargo xtask setup`.
pub const DEFAULT_MODEL: &str = "checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `--method`: how Task 1 or Task 2 is answered.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum MethodArg {
    ZeroShot,
    FewShot,
    Sft,
}

/// The method a `--method` / `--adapter` / `--model` combination asks for; an adapter goes with SFT
/// only, and SFT needs an adapter or a fully fine-tuned model folder of its own.
pub(crate) fn method_of(
    method: MethodArg,
    adapter: Option<&Path>,
    model: &Path,
) -> anyhow::Result<Method> {
    Ok(match (method, adapter) {
        (MethodArg::Sft, Some(_)) => Method::Sft,
        (MethodArg::Sft, None) if model != Path::new(DEFAULT_MODEL) => Method::Sft,
        (MethodArg::Sft, None) => bail!(
            "--method sft needs --adapter DIR (LoRA), or --model DIR for a fully fine-tuned model"
        ),
        (_, Some(_)) => bail!("--adapter only goes with --method sft"),
        (MethodArg::ZeroShot, None) => Method::ZeroShot,
        (MethodArg::FewShot, None) => Method::FewShot,
    })
}

/// The split for `task`: read from `data` (a `supportlm data split` folder) or made from the shipped
/// data.
pub(crate) fn load_splits(data: Option<&Path>, task: Task) -> anyhow::Result<SplitSet> {
    let splits = match data {
        Some(dir) => SplitSet::read(dir).with_context(|| format!("reading {}", dir.display()))?,
        None => {
            let input = shipped::default_input();
            shipped::verify_if_shipped(&input)?;
            split::split(
                &load_csv(&input)?,
                &SplitConfig {
                    task,
                    ..Default::default()
                },
            )?
        }
    };
    if splits.config.task != task {
        bail!("the split is for task {}, not {task}", splits.config.task);
    }
    Ok(splits)
}

/// `limit` records drawn with `seed` (the same ones for every method), in id order; all without a limit.
pub(crate) fn sample(records: &[Record], limit: Option<usize>, seed: u64) -> Vec<Record> {
    let mut records = records.to_vec();
    if let Some(n) = limit {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        records.shuffle(&mut rng);
        records.truncate(n);
        records.sort_by_key(|r| r.id);
    }
    records
}

/// The device `--device` (or `SUPPORTLM_DEVICE`) names; opened when a command first needs it.
static DEVICE_FLAG: OnceLock<Option<String>> = OnceLock::new();
static DEVICE: OnceLock<Device> = OnceLock::new();

/// Records `--device` for [`device`].
pub(crate) fn choose_device(flag: Option<&str>) {
    let _ = DEVICE_FLAG.set(flag.map(str::to_string));
}

/// The device models run on: `--device`, else `SUPPORTLM_DEVICE`, else the CPU; a name that does not
/// parse, a backend this binary lacks or a GPU that does not open is an error naming it.
pub(crate) fn device() -> anyhow::Result<Device> {
    if let Some(d) = DEVICE.get() {
        return Ok(d.clone());
    }
    let flag = DEVICE_FLAG.get().cloned().flatten();
    let spec = DeviceSpec::choose(flag.as_deref())?;
    let device = spec.open()?;
    if !spec.is_cpu() {
        tracing::info!("running on {spec}");
    }
    Ok(DEVICE.get_or_init(|| device).clone())
}

/// A model, with an adapter applied when given.
pub(crate) fn load_model(path: &Path, adapter: Option<&Path>) -> anyhow::Result<Model> {
    let mut model = Model::load(path, &device()?).context("loading the model")?;
    if let Some(dir) = adapter {
        model = model
            .load_adapter(dir)
            .with_context(|| format!("applying {}", dir.display()))?;
    }
    Ok(model)
}
