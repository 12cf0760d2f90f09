//! Validation-loss bookkeeping: the best loss so far, and stopping after `patience` evaluations
//! without an improvement of more than `min_delta`.

use crate::state::TrainerState;

/// The early-stopping rule of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStopping {
    /// An improvement must beat the best loss by more than this.
    pub min_delta: f64,
    /// Stop after this many evaluations without improvement (never when `None`).
    pub patience: Option<usize>,
}

impl EarlyStopping {
    /// Records validation loss `loss` at `st.step` and returns whether it is the new best (the caller
    /// then keeps the weights); sets `st.stopped_early` when patience runs out.
    pub fn record(&self, st: &mut TrainerState, loss: f64) -> bool {
        st.last_val_loss = Some(loss);
        let improved = st.best_val_loss.is_none_or(|b| loss < b - self.min_delta);
        if improved {
            st.best_val_loss = Some(loss);
            st.best_step = Some(st.step);
            st.evals_without_improvement = 0;
        } else {
            st.evals_without_improvement += 1;
            if self
                .patience
                .is_some_and(|p| st.evals_without_improvement >= p)
            {
                st.stopped_early = true;
            }
        }
        improved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainerState {
        TrainerState {
            step: 0,
            total_steps: 100,
            best_val_loss: None,
            last_val_loss: None,
            best_step: None,
            evals_without_improvement: 0,
            stopped_early: false,
            config: String::new(),
        }
    }

    #[test]
    fn the_first_loss_is_the_best_and_small_gains_do_not_count() {
        let rule = EarlyStopping {
            min_delta: 0.01,
            patience: Some(2),
        };
        let mut st = state();
        assert!(rule.record(&mut st, 2.0));
        st.step = 10;
        assert!(rule.record(&mut st, 1.5));
        assert_eq!((st.best_val_loss, st.best_step), (Some(1.5), Some(10)));
        st.step = 20;
        // 1.495 is better by less than min_delta: no improvement.
        assert!(!rule.record(&mut st, 1.495));
        assert!(!st.stopped_early);
        st.step = 30;
        assert!(!rule.record(&mut st, 1.6));
        assert!(st.stopped_early, "two evaluations without improvement");
        assert_eq!((st.best_val_loss, st.best_step), (Some(1.5), Some(10)));
    }

    #[test]
    fn without_patience_a_run_never_stops_early() {
        let rule = EarlyStopping {
            min_delta: 0.0,
            patience: None,
        };
        let mut st = state();
        rule.record(&mut st, 1.0);
        for _ in 0..50 {
            assert!(!rule.record(&mut st, 2.0));
        }
        assert!(!st.stopped_early);
        assert_eq!(st.evals_without_improvement, 50);
    }
}
