//! Symmetric 8-bit weights with one absmax per output row (LLM.int8's vector-wise scale, without the
//! outlier decomposition): `q = round_half_even(w · 127 / absmax_row)`, `w ≈ q · absmax_row / 127`.

use rayon::prelude::*;

/// A `[rows, cols]` matrix in int8 with per-row scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// The quantized values, row-major.
    pub codes: Vec<i8>,
    /// Each row's absolute maximum (the scale is `absmax / 127`).
    pub absmax: Vec<f32>,
}

impl Int8Matrix {
    /// Quantizes `values` (row-major `[rows, cols]`), rounding half to even.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        let absmax: Vec<f32> = values
            .par_chunks(cols.max(1))
            .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let mut codes = vec![0i8; values.len()];
        codes
            .par_chunks_mut(cols.max(1))
            .zip(values.par_chunks(cols.max(1)))
            .zip(absmax.par_iter())
            .for_each(|((out, row), &m)| {
                let s = if m > 0.0 { 127.0 / m } else { 0.0 };
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = (v * s).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
            });
        Int8Matrix {
            rows,
            cols,
            codes,
            absmax,
        }
    }

    /// The dequantized values in a fresh buffer.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        self.dequantize_into(&mut out);
        out
    }

    /// The values as f32 into `out` (`rows · cols` long), row-major.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.codes.len(),
            "int8 output buffer has the wrong length"
        );
        out.par_chunks_mut(self.cols.max(1))
            .zip(self.codes.par_chunks(self.cols.max(1)))
            .zip(self.absmax.par_iter())
            .for_each(|((out, row), &m)| {
                let s = m / 127.0;
                for (o, &q) in out.iter_mut().zip(row) {
                    *o = q as f32 * s;
                }
            });
    }

    /// Bytes this matrix keeps resident (codes and scales).
    pub fn resident_bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_at_most_half_a_step_per_row() {
        let values: Vec<f32> = (0..3 * 50)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let q = Int8Matrix::quantize(&values, 3, 50);
        let mut back = vec![0f32; values.len()];
        q.dequantize_into(&mut back);
        for r in 0..3 {
            let step = q.absmax[r] / 127.0;
            for c in 0..50 {
                let i = r * 50 + c;
                assert!((values[i] - back[i]).abs() <= step * 0.5 + 1e-6);
            }
        }
    }

    #[test]
    fn zero_row_stays_zero() {
        let q = Int8Matrix::quantize(&[0.0; 8], 2, 4);
        let mut back = vec![1f32; 8];
        q.dequantize_into(&mut back);
        assert!(back.iter().all(|&v| v == 0.0));
    }
}
