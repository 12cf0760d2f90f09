//! Agreement between human raters: Cohen's kappa for two raters and Fleiss' kappa for any number,
//! over nominal categories.

use crate::classification::cohen_kappa_of;

/// Cohen's kappa between two raters' scores of the same units (sklearn's `cohen_kappa_score`,
/// unweighted). `None` without units or when the lengths differ.
pub fn cohen_kappa(a: &[u32], b: &[u32]) -> Option<f64> {
    if a.is_empty() || a.len() != b.len() {
        return None;
    }
    let a: Vec<String> = a.iter().map(u32::to_string).collect();
    let b: Vec<String> = b.iter().map(u32::to_string).collect();
    Some(cohen_kappa_of(&a, &b))
}

/// Fleiss' kappa from `counts[unit][category]`: how many raters put each unit in each category;
/// every unit must have the same number of raters (at least 2). `None` when that does not hold or
/// when all ratings fall in one category (chance agreement is then 1 and kappa undefined).
pub fn fleiss_kappa(counts: &[Vec<usize>]) -> Option<f64> {
    let n_units = counts.len();
    let raters: usize = counts.first()?.iter().sum();
    if raters < 2 || counts.iter().any(|row| row.iter().sum::<usize>() != raters) {
        return None;
    }
    let k = counts[0].len();
    if counts.iter().any(|row| row.len() != k) {
        return None;
    }
    let n = raters as f64;
    let total = n_units as f64 * n;
    // Observed agreement per unit, averaged.
    let p_bar = counts
        .iter()
        .map(|row| {
            let s: f64 = row.iter().map(|&c| (c * c) as f64).sum();
            (s - n) / (n * (n - 1.0))
        })
        .sum::<f64>()
        / n_units as f64;
    // Chance agreement from the categories' overall shares.
    let p_e: f64 = (0..k)
        .map(|j| {
            let p = counts.iter().map(|row| row[j]).sum::<usize>() as f64 / total;
            p * p
        })
        .sum();
    if (1.0 - p_e).abs() < 1e-12 {
        return None;
    }
    Some((p_bar - p_e) / (1.0 - p_e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Fleiss' kappa (10 units, 14 raters, 5 categories; e.g. Wikipedia's
    /// "Fleiss' kappa"): P-bar = 0.378, P-e = 0.213, kappa = 0.210.
    #[test]
    fn fleiss_worked_example() {
        let counts = vec![
            vec![0, 0, 0, 0, 14],
            vec![0, 2, 6, 4, 2],
            vec![0, 0, 3, 5, 6],
            vec![0, 3, 9, 2, 0],
            vec![2, 2, 8, 1, 1],
            vec![7, 7, 0, 0, 0],
            vec![3, 2, 6, 3, 0],
            vec![2, 5, 3, 2, 2],
            vec![6, 5, 2, 1, 0],
            vec![0, 2, 2, 3, 7],
        ];
        let kappa = fleiss_kappa(&counts).unwrap();
        assert!((kappa - 0.20993).abs() < 5e-5, "{kappa}");
    }

    #[test]
    fn fleiss_edge_cases() {
        // Perfect agreement over two categories.
        assert_eq!(fleiss_kappa(&[vec![3, 0], vec![0, 3]]), Some(1.0));
        // Unequal rater counts, one rater, one category only, no units.
        assert_eq!(fleiss_kappa(&[vec![3, 0], vec![1, 1]]), None);
        assert_eq!(fleiss_kappa(&[vec![1, 0], vec![0, 1]]), None);
        assert_eq!(fleiss_kappa(&[vec![2, 0], vec![2, 0]]), None);
        assert_eq!(fleiss_kappa(&[]), None);
    }

    #[test]
    fn two_raters_as_fleiss_and_cohen() {
        // By hand: a = [0,0,1,1,2,2], b = [0,1,1,1,2,0]; observed 4/6; marginals a (2,2,2), b (2,3,1)
        // -> chance (4 + 6 + 2) / 36 = 1/3; Cohen = (2/3 - 1/3) / (2/3) = 0.5.
        let (a, b) = ([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]);
        assert!((cohen_kappa(&a, &b).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(cohen_kappa(&a, &b[..5]), None);
        // Fleiss with two raters pools the marginals (Scott's pi): chance (16 + 25 + 9) / 144,
        // kappa = (96 - 50) / (144 - 50) = 46 / 94.
        let counts: Vec<Vec<usize>> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| {
                let mut row = vec![0; 3];
                row[x as usize] += 1;
                row[y as usize] += 1;
                row
            })
            .collect();
        assert!((fleiss_kappa(&counts).unwrap() - 46.0 / 94.0).abs() < 1e-12);
        assert_eq!(cohen_kappa(&[], &[]), None);
    }
}
