//! Which device a command runs its model on: `--device cpu|wgpu[:N]|cuda[:N]` (or `SUPPORTLM_DEVICE`).
//!
//! `cpu` is Burn's CPU backend (burn-flex) plus this project's host paths (the quantized decode
//! kernels, the hand-written training step); it is the default and always compiled in. `wgpu` and
//! `cuda` are Burn's GPU backends, compiled in by the features of the same names: everything then runs
//! in Burn tensor ops on that device (see docs/GPU.md for what stays on the device and how close the
//! results are to the CPU's).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{ModelError, Result};

/// The environment variable read when no `--device` is given.
pub const DEVICE_ENV: &str = "SUPPORTLM_DEVICE";

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// Burn's CPU backend and the host kernels (the default).
    #[default]
    Cpu,
    /// Burn's `wgpu` backend: the adapter wgpu prefers (`wgpu`), or the N-th discrete GPU (`wgpu:N`).
    Wgpu(Option<usize>),
    /// Burn's `cuda` backend: GPU N (`cuda:N`; `cuda` is GPU 0).
    Cuda(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        let (kind, index) = match s.split_once(':') {
            Some((kind, index)) => {
                let n = index.parse::<usize>().map_err(|_| {
                    ModelError::Device(format!(
                        "`{s}`: `{index}` is not a device number (expected e.g. `{kind}:0`)"
                    ))
                })?;
                (kind, Some(n))
            }
            None => (s.as_str(), None),
        };
        match (kind, index) {
            ("cpu", None) => Ok(DeviceSpec::Cpu),
            ("wgpu", n) => Ok(DeviceSpec::Wgpu(n)),
            ("cuda", n) => Ok(DeviceSpec::Cuda(n)),
            ("cpu", Some(_)) => Err(ModelError::Device(
                "`cpu` takes no number: the CPU backend uses every core".into(),
            )),
            _ => Err(ModelError::Device(format!(
                "unknown device `{s}`: expected cpu, wgpu, wgpu:N, cuda or cuda:N"
            ))),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, index) = match self {
            DeviceSpec::Cpu => ("cpu", None),
            DeviceSpec::Wgpu(n) => ("wgpu", *n),
            DeviceSpec::Cuda(n) => ("cuda", *n),
        };
        match index {
            Some(n) => write!(f, "{kind}:{n}"),
            None => f.write_str(kind),
        }
    }
}

impl DeviceSpec {
    /// `--device` when given, else `SUPPORTLM_DEVICE` when set, else the CPU.
    pub fn choose(flag: Option<&str>) -> Result<Self> {
        match flag {
            Some(s) => s.parse(),
            None => match std::env::var(DEVICE_ENV) {
                Ok(s) if !s.trim().is_empty() => s.parse().map_err(|e: ModelError| match e {
                    ModelError::Device(why) => ModelError::Device(format!("{DEVICE_ENV}: {why}")),
                    other => other,
                }),
                _ => Ok(DeviceSpec::Cpu),
            },
        }
    }

    /// The GPU to test or benchmark on: `SUPPORTLM_DEVICE` when it names a GPU, else the first GPU
    /// backend this build has (`wgpu`, then `cuda`); `None` in a CPU-only build.
    pub fn gpu_from_env() -> Option<DeviceSpec> {
        let built_in = if cfg!(feature = "wgpu") {
            DeviceSpec::Wgpu(None)
        } else if cfg!(feature = "cuda") {
            DeviceSpec::Cuda(None)
        } else {
            return None;
        };
        Some(
            DeviceSpec::choose(None)
                .ok()
                .filter(|s| !s.is_cpu())
                .unwrap_or(built_in),
        )
    }

    /// Whether this is the CPU (the host paths run).
    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }

    /// The Burn device, opened and checked with one small operation, so that a missing driver or GPU
    /// is an error here rather than a panic in the middle of a run. Asking for a backend this binary
    /// was built without names the feature to build with.
    pub fn open(self) -> Result<Device> {
        let device = self.device()?;
        if !self.is_cpu() {
            probe(self, &device)?;
        }
        Ok(device)
    }

    /// The Burn device, not yet opened.
    fn device(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::flex()),
            DeviceSpec::Wgpu(n) => wgpu_device(n),
            DeviceSpec::Cuda(n) => cuda_device(n),
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device(n: Option<usize>) -> Result<Device> {
    use burn::tensor::DeviceKind;
    Ok(Device::wgpu(match n {
        Some(n) => DeviceKind::DiscreteGpu(n),
        None => DeviceKind::DefaultDevice,
    }))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_: Option<usize>) -> Result<Device> {
    Err(not_built("wgpu"))
}

#[cfg(feature = "cuda")]
fn cuda_device(n: Option<usize>) -> Result<Device> {
    Ok(Device::cuda(n.unwrap_or(0)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_: Option<usize>) -> Result<Device> {
    Err(not_built("cuda"))
}

#[cfg(any(not(feature = "wgpu"), not(feature = "cuda")))]
fn not_built(feature: &str) -> ModelError {
    ModelError::Device(format!(
        "`{feature}` asked for, but this binary was built without Burn's {feature} backend: \
         build with `--features {feature}` (e.g. `cargo build --release -p supportlm --features \
         {feature}`; docs/GPU.md)"
    ))
}

/// Runs one small operation on `device` and reads it back. GPU runtimes report a missing adapter or
/// driver by panicking on first use; that panic becomes an error naming the device.
fn probe(spec: DeviceSpec, device: &Device) -> Result<()> {
    use burn::tensor::{Tensor, TensorData};
    let device = device.clone();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(move || {
        let t = Tensor::<1>::from_data(TensorData::new(vec![1f32, 2.0], [2]), &device);
        (t * 2.0).sum().into_scalar::<f32>()
    });
    std::panic::set_hook(quiet);
    match outcome {
        Ok(6.0) => Ok(()),
        Ok(v) => Err(ModelError::Device(format!(
            "`{spec}` computed 2·(1 + 2) = {v}: its backend is not working"
        ))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no reason given");
            let hint = match spec {
                DeviceSpec::Wgpu(Some(_)) => {
                    "`wgpu:N` is the N-th discrete GPU, counted from 0; `wgpu` alone takes the \
                     adapter wgpu prefers (lavapipe on a machine without a GPU)"
                }
                DeviceSpec::Cuda(_) => "is the NVIDIA driver installed, and is there such a GPU?",
                _ => {
                    "is a driver installed? on a machine without a GPU, `wgpu` runs on Mesa's \
                     lavapipe: apt-get install mesa-vulkan-drivers"
                }
            };
            Err(ModelError::Device(format!(
                "`{spec}` could not be opened ({why}): {hint}"
            )))
        }
    }
}

/// Values read back from a device other than the CPU on this thread: how often and how many. Every
/// read of the model and training crates goes through [`note_read`] ([`crate::llama::to_vec`] does),
/// so tests can hold the GPU paths to their promise (greedy decoding reads only token ids; a training
/// step reads its loss and its gradients once, not per layer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostReads {
    /// Reads (each one a synchronisation with the device).
    pub reads: usize,
    /// Values read.
    pub values: usize,
}

thread_local! {
    static HOST_READS: std::cell::Cell<HostReads> = const {
        std::cell::Cell::new(HostReads { reads: 0, values: 0 })
    };
}

/// The reads counted on this thread so far.
pub fn host_reads() -> HostReads {
    HOST_READS.with(std::cell::Cell::get)
}

/// Counts a read of `values` values from `device` (nothing on the CPU, where there is no copy).
pub fn note_read(device: &Device, values: usize) {
    if !is_cpu(device) {
        HOST_READS.with(|c| {
            let r = c.get();
            c.set(HostReads {
                reads: r.reads + 1,
                values: r.values + values,
            })
        });
    }
}

/// Whether `device` is the CPU backend, where the host paths (quantized decode kernels, the
/// hand-written training step) run instead of Burn tensor ops.
pub fn is_cpu(device: &Device) -> bool {
    *device == Device::flex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("wgpu", DeviceSpec::Wgpu(None)),
            ("wgpu:1", DeviceSpec::Wgpu(Some(1))),
            ("cuda", DeviceSpec::Cuda(None)),
            ("CUDA:0", DeviceSpec::Cuda(Some(0))),
        ] {
            let parsed: DeviceSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string(), text.to_ascii_lowercase());
        }
        for bad in ["gpu", "cuda:x", "cpu:1", "wgpu:", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(matches!(err, ModelError::Device(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn the_cpu_opens_and_is_the_host() {
        let device = DeviceSpec::Cpu.open().unwrap();
        assert!(is_cpu(&device));
        assert!(DeviceSpec::choose(Some("cpu")).unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_backend_not_built_in_names_its_feature() {
        let err = DeviceSpec::Cuda(Some(0)).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
