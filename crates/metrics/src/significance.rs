//! McNemar's test for two systems scored on the same items, as statsmodels computes it; and the
//! two-proportion z-test for accuracies measured on different items (statsmodels' `proportions_ztest`).

use serde::{Deserialize, Serialize};

/// The paired outcome counts and both forms of the test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// Items both got right.
    pub both_correct: usize,
    /// Items only the first got right.
    pub a_only: usize,
    /// Items only the second got right.
    pub b_only: usize,
    /// Items both got wrong.
    pub both_wrong: usize,
    /// Two-sided exact binomial test on the discordant pairs (`exact=True`).
    pub exact_p: f64,
    /// `(|b - c| - 1)² / (b + c)` (`exact=False, correction=True`) and its chi-square(1) p-value.
    pub chi2_statistic: f64,
    /// The chi-square statistic's p-value.
    pub chi2_p: f64,
}

/// `ln C(n, k)`.
fn ln_choose(n: usize, k: usize) -> f64 {
    libm::lgamma(n as f64 + 1.0) - libm::lgamma(k as f64 + 1.0) - libm::lgamma((n - k) as f64 + 1.0)
}

/// McNemar's test from per-item correctness of systems A and B.
pub fn mcnemar(a_correct: &[bool], b_correct: &[bool]) -> McNemar {
    assert_eq!(
        a_correct.len(),
        b_correct.len(),
        "systems scored on different items"
    );
    let (mut both_correct, mut a_only, mut b_only, mut both_wrong) = (0, 0, 0, 0);
    for (&a, &b) in a_correct.iter().zip(b_correct) {
        match (a, b) {
            (true, true) => both_correct += 1,
            (true, false) => a_only += 1,
            (false, true) => b_only += 1,
            (false, false) => both_wrong += 1,
        }
    }
    let n = a_only + b_only;
    let m = a_only.min(b_only);
    let exact_p = if n == 0 {
        1.0
    } else {
        let ln_half_n = n as f64 * std::f64::consts::LN_2;
        let cdf: f64 = (0..=m).map(|k| (ln_choose(n, k) - ln_half_n).exp()).sum();
        (2.0 * cdf).min(1.0)
    };
    let (chi2_statistic, chi2_p) = if n == 0 {
        (0.0, 1.0)
    } else {
        let d = (a_only as f64 - b_only as f64).abs() - 1.0;
        let stat = d * d / n as f64;
        // Survival function of chi-square with 1 degree of freedom.
        (stat, libm::erfc((stat / 2.0).sqrt()))
    };
    McNemar {
        both_correct,
        a_only,
        b_only,
        both_wrong,
        exact_p,
        chi2_statistic,
        chi2_p,
    }
}

/// Two accuracies on different items (e.g. one method in and out of distribution): the pooled
/// two-proportion z-test, as statsmodels' `proportions_ztest(count=[k1, k2], nobs=[n1, n2])`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TwoProportions {
    /// `k1/n1 − k2/n2`.
    pub difference: f64,
    /// The z statistic (0 when both shares are 0 or 1: no variance).
    pub z: f64,
    /// Its two-sided p-value.
    pub p: f64,
}

/// The two-proportion z-test of `k1` successes in `n1` against `k2` in `n2`.
pub fn two_proportion_test(k1: usize, n1: usize, k2: usize, n2: usize) -> TwoProportions {
    if n1 == 0 || n2 == 0 {
        return TwoProportions {
            difference: 0.0,
            z: 0.0,
            p: 1.0,
        };
    }
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let pooled = (k1 + k2) as f64 / (n1 + n2) as f64;
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    let z = if se > 0.0 { (p1 - p2) / se } else { 0.0 };
    TwoProportions {
        difference: p1 - p2,
        z,
        p: libm::erfc(z.abs() / std::f64::consts::SQRT_2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_proportions_match_statsmodels() {
        // statsmodels.stats.proportion.proportions_ztest([80, 60], [100, 100]) → (3.0861, 0.0020282)
        let t = two_proportion_test(80, 100, 60, 100);
        assert!((t.z - 3.086066999241839).abs() < 1e-9, "{t:?}");
        assert!((t.p - 0.0020282311484520776).abs() < 1e-9, "{t:?}");
        assert!((t.difference - 0.2).abs() < 1e-12);
        // Symmetric, and no variance means no evidence.
        assert!((two_proportion_test(60, 100, 80, 100).z + t.z).abs() < 1e-12);
        assert_eq!(two_proportion_test(10, 10, 5, 5).p, 1.0);
        assert_eq!(two_proportion_test(0, 0, 5, 5).p, 1.0);
    }
}
