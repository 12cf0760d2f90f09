//! Confidence intervals: Wilson's score interval for a proportion and the seeded percentile bootstrap.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A point estimate with a two-sided interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The point estimate.
    pub estimate: f64,
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Wilson score interval for `successes` out of `n` at normal quantile `z`.
pub fn wilson_interval(successes: usize, n: usize, z: f64) -> Interval {
    if n == 0 {
        return Interval {
            estimate: 0.0,
            low: 0.0,
            high: 0.0,
        };
    }
    let n_f = n as f64;
    let p = successes as f64 / n_f;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n_f)) / (1.0 + z2 / n_f);
    let half = z / (1.0 + z2 / n_f) * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    Interval {
        estimate: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    }
}

/// Percentile bootstrap: resamples item indices `resamples` times (seeded) and returns the statistic on
/// all items with the `(1-level)/2` and `(1+level)/2` percentiles of the resampled statistics
/// (linear interpolation between order statistics, as numpy's default).
pub fn bootstrap_ci(
    n: usize,
    resamples: usize,
    level: f64,
    seed: u64,
    stat: impl Fn(&[usize]) -> f64,
) -> Interval {
    let all: Vec<usize> = (0..n).collect();
    let estimate = stat(&all);
    if n == 0 || resamples == 0 {
        return Interval {
            estimate,
            low: estimate,
            high: estimate,
        };
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx = vec![0usize; n];
    let mut values: Vec<f64> = (0..resamples)
        .map(|_| {
            idx.iter_mut().for_each(|i| *i = rng.random_range(0..n));
            stat(&idx)
        })
        .collect();
    values.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let pos = p * (values.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
    };
    Interval {
        estimate,
        low: q((1.0 - level) / 2.0),
        high: q((1.0 + level) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_statsmodels() {
        // statsmodels.stats.proportion.proportion_confint(245, 300, method="wilson")
        let i = wilson_interval(245, 300, Z95);
        assert!((i.low - 0.7689713823226987).abs() < 1e-9, "{}", i.low);
        assert!((i.high - 0.8563547359017554).abs() < 1e-9, "{}", i.high);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_estimate() {
        let correct: Vec<f64> = (0..200)
            .map(|i| if i % 4 == 0 { 0.0 } else { 1.0 })
            .collect();
        let acc = |idx: &[usize]| idx.iter().map(|&i| correct[i]).sum::<f64>() / idx.len() as f64;
        let a = bootstrap_ci(200, 1000, 0.95, 7, acc);
        let b = bootstrap_ci(200, 1000, 0.95, 7, acc);
        assert_eq!(a, b);
        assert_eq!(a.estimate, 0.75);
        assert!(a.low < 0.75 && a.high > 0.75 && a.high - a.low < 0.15);
    }
}
