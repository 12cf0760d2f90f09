//! One driver for a training step, and the paths that plug into it.
//!
//! Every path runs the same three phases: forward through every layer keeping what its backward
//! reads, the final norm + LM head + cross-entropy (loss and the gradient at the last layer's output),
//! then backward through the layers in reverse, collecting each adapter pair's gradients. [`drive`]
//! is that loop; a [`Pass`] says how one layer and the head run:
//! - [`StepPath::Host`]: host buffers, `gemm` products and fused row loops (`host.rs`): the CPU default.
//! - [`StepPath::Saved`]: the same maths in Burn tensor ops (`saved.rs`, `backprop.rs`): any device,
//!   and the reference the tests hold the host path to.
//! - [`StepPath::Recompute`]: keeps only each layer's input and re-runs the layer under Burn's
//!   autodiff in backward (`recompute.rs`): a third forward pass's work for one layer's activations in
//!   memory instead of all of them.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor};
use supportlm_model::error::{ModelError, Result};
use supportlm_model::lora::Target;

use super::dropout::{Dropout, TrainLayer};
use super::factors::DeviceFactors;
use super::layout::Layout;
use super::{LossSum, QloraModel};

/// What every pass of one step reads: the base, the laid-out batch and the step's dropout.
#[derive(Clone, Copy)]
pub(super) struct StepInputs<'a> {
    pub model: &'a QloraModel,
    pub layout: &'a Layout,
    pub dropout: Option<Dropout>,
}

impl StepInputs<'_> {
    /// Layer `l` as the step runs it on the device (weights dequantized now, this step's dropout
    /// masks) with `factors`, and those factors of the layer (tracked for autodiff when `track`).
    pub fn layer(
        &self,
        factors: &DeviceFactors,
        l: usize,
        track: bool,
    ) -> (BTreeMap<Target, (Tensor<2>, Tensor<2>)>, TrainLayer) {
        let lora = factors.layer(l, track);
        let rows = self.layout.b * self.layout.s;
        let layer = self
            .model
            .layer(l, &lora, factors.config().scale(), self.dropout, rows);
        (lora, layer)
    }
}

/// How a LoRA training step runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepPath {
    /// Stored activations on host buffers (CPU backend only; other devices run [`StepPath::Saved`]).
    Host,
    /// Stored activations, Burn tensor ops.
    Saved,
    /// Layer inputs only; each layer recomputed under autodiff in backward.
    Recompute,
}

impl StepPath {
    /// The path for a run that keeps activations (`store_activations`) or not, on `device`.
    pub fn choose(store_activations: bool, device: &Device) -> StepPath {
        match (store_activations, supportlm_model::device::is_cpu(device)) {
            (false, _) => StepPath::Recompute,
            (true, true) => StepPath::Host,
            (true, false) => StepPath::Saved,
        }
    }

    /// The name in the step's debug log.
    pub fn as_str(self) -> &'static str {
        match self {
            StepPath::Host => "host",
            StepPath::Saved => "stored activations",
            StepPath::Recompute => "recomputed layers",
        }
    }
}

/// The gradients of one layer's adapter pairs, by projection.
pub(super) type LayerGrads<G> = Vec<(Target, G)>;

/// One training step's layer and head computations, for [`drive`].
pub(super) trait Pass {
    /// Activations (and their gradients) between layers.
    type Hidden;
    /// What one layer keeps from forward for its backward.
    type Kept;
    /// The gradient of one adapter pair (host values, or flat tensors left on the device).
    type PairGrad;

    /// The embedded batch.
    fn embed(&mut self) -> Result<Self::Hidden>;

    /// Layer `l` forward: its output and what its backward reads.
    fn forward(
        &mut self,
        l: usize,
        x: Self::Hidden,
        clock: &mut StepClock,
    ) -> Result<(Self::Hidden, Self::Kept)>;

    /// Final norm, LM head and cross-entropy on the last layer's output: the loss and the gradient at
    /// that output.
    fn head(&mut self, x: Self::Hidden) -> Result<(LossSum, Self::Hidden)>;

    /// Layer `l` backward: the gradient at its input and its adapter pairs' gradients.
    fn backward(
        &mut self,
        l: usize,
        kept: Self::Kept,
        grad: Self::Hidden,
        clock: &mut StepClock,
    ) -> Result<(Self::Hidden, LayerGrads<Self::PairGrad>)>;
}

/// The summed loss of a step and each adapter pair's gradient.
pub(super) type Driven<G> = (LossSum, BTreeMap<(usize, Target), G>);

/// Runs a step through `pass` over `layers` layers: forward, head, backward; logs the phases' times.
pub(super) fn drive<P: Pass>(
    pass: &mut P,
    layers: usize,
    path: StepPath,
) -> Result<Driven<P::PairGrad>> {
    let mut clock = StepClock::start();
    let mut x = pass.embed()?;
    let mut kept = Vec::with_capacity(layers);
    for l in 0..layers {
        let (next, k) = pass.forward(l, x, &mut clock)?;
        kept.push(k);
        x = next;
    }
    clock.forward_done();
    let (loss, mut grad) = pass.head(x)?;
    clock.head_done();
    let mut grads = BTreeMap::new();
    for l in (0..layers).rev() {
        let k = kept
            .pop()
            .ok_or_else(|| ModelError::Internal(format!("layer {l}'s activations are missing")))?;
        let (dx, pairs) = pass.backward(l, k, grad, &mut clock)?;
        for (t, pair) in pairs {
            grads.insert((l, t), pair);
        }
        grad = dx;
    }
    clock.log(path.as_str());
    Ok((loss, grads))
}

/// Times a training step's phases (forward, head and loss, backward) for one debug log line.
pub(super) struct StepClock {
    start: std::time::Instant,
    forward: std::time::Duration,
    head: std::time::Duration,
    /// Time spent preparing layers' frozen weights (dequantization), forward and backward.
    weights: std::time::Duration,
}

impl StepClock {
    pub fn start() -> Self {
        StepClock {
            start: std::time::Instant::now(),
            forward: Default::default(),
            head: Default::default(),
            weights: Default::default(),
        }
    }

    /// Adds the time since `since` to the weight-preparation total.
    pub fn weights_since(&mut self, since: std::time::Instant) {
        self.weights += since.elapsed();
    }

    pub fn forward_done(&mut self) {
        self.forward = self.start.elapsed();
    }

    pub fn head_done(&mut self) {
        self.head = self.start.elapsed() - self.forward;
    }

    pub fn log(&self, path: &str) {
        let backward = self.start.elapsed() - self.forward - self.head;
        tracing::debug!(
            forward_ms = self.forward.as_millis() as u64,
            head_ms = self.head.as_millis() as u64,
            backward_ms = backward.as_millis() as u64,
            weights_ms = self.weights.as_millis() as u64,
            path,
            "training step"
        );
    }
}
