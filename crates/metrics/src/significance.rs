//! McNemar's test for two systems scored on the same items, as statsmodels computes it.

use serde::Serialize;

/// The paired outcome counts and both forms of the test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
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
