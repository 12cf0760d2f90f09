//! Dense f32 matrix products on host buffers, for the CPU paths that bypass tensor ops (the training
//! step, the prompt pass): faer's x86-64 kernels (`private-gemm-x86`, AVX2 or AVX-512 as [`crate::cpu`]
//! decides, so `SUPPORTLM_SIMD` caps them too) and the `gemm` crate elsewhere. Operands are strided
//! views ([`Op`]), so column blocks of wider matrices and transposed weights need no copies.

use gemm::Parallelism;

/// Products of at least this many multiply-adds use every thread (as the CPU backend decides).
pub const PARALLEL_WORK: usize = 192 * 192 * 192;

/// A matrix operand: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Op<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> Op<'a> {
    /// Row-major with `cols` columns (a row stride of `cols`).
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Op {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// Row-major rows of stride `rs` (a column block of a wider matrix).
    pub fn strided(data: &'a [f32], rs: usize) -> Self {
        Op { data, rs, cs: 1 }
    }

    /// The transpose (strides swapped, no copy).
    pub fn t(self) -> Self {
        Op {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "{what} operand out of bounds");
        }
    }
}

/// `dst[m, n] (+)= beta · a[m, k] · b[k, n]`, `dst` row-major with row stride `dst_rs`; accumulates
/// into `dst` when `add`. `threads`: split large products over as many threads as rayon's pool has.
/// On x86-64 with AVX2 or AVX-512 the products run on faer's kernels (`private-gemm-x86`: 1.2-1.6x the
/// `gemm` crate's rate on the training step's shapes, README: training speed), elsewhere on `gemm`.
#[allow(clippy::too_many_arguments)]
pub fn mm(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: Op,
    b: Op,
    beta: f32,
    add: bool,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "product destination out of bounds"
    );
    a.check(m, k, "left");
    b.check(k, n, "right");
    if k == 0 {
        if !add {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let parallel = threads && m * n * k >= PARALLEL_WORK;
    #[cfg(target_arch = "x86_64")]
    if let Some(instr) = x86_instr() {
        use private_gemm_x86::{Accum, DType, DstKind, IType};
        let n_threads = if parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        // SAFETY: as below; the kernels' instruction set was detected at run time (`cpu::simd`).
        unsafe {
            private_gemm_x86::gemm(
                DType::F32,
                IType::U64,
                instr,
                m,
                n,
                k,
                dst.as_mut_ptr() as *mut (),
                dst_rs as isize,
                1,
                std::ptr::null(),
                std::ptr::null(),
                DstKind::Full,
                if add { Accum::Add } else { Accum::Replace },
                a.data.as_ptr() as *const (),
                a.rs as isize,
                a.cs as isize,
                false,
                std::ptr::null(),
                0,
                b.data.as_ptr() as *const (),
                b.rs as isize,
                b.cs as isize,
                false,
                &beta as *const f32 as *const (),
                n_threads,
            );
        }
        return;
    }
    let parallelism = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every element gemm reads or writes inside the three slices, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            add,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The GEMM [`mm`] runs on, as the benchmarks name it.
pub fn library() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    match x86_instr() {
        Some(private_gemm_x86::InstrSet::Avx512) => return "private-gemm-x86 (faer) avx512",
        Some(private_gemm_x86::InstrSet::Avx256) => return "private-gemm-x86 (faer) avx2",
        None => {}
    }
    "gemm (portable)"
}

/// `c[m, n] = a[m, k] · b[k, n]`, all row-major, through [`mm`] on every thread: what the benchmarks time
/// the training step and the prompt pass against.
pub fn product(c: &mut [f32], a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) {
    assert_eq!(c.len(), m * n, "product destination size");
    assert_eq!(a.len(), m * k, "product left operand size");
    assert_eq!(b.len(), k * n, "product right operand size");
    mm(
        c,
        n,
        (m, n, k),
        Op::rows(a, k),
        Op::rows(b, n),
        1.0,
        false,
        true,
    );
}

/// The instruction set of faer's x86-64 GEMM for the products (`None`: the `gemm` crate's portable
/// path), from the one CPU check every kernel goes through, so `SUPPORTLM_SIMD` caps it too.
#[cfg(target_arch = "x86_64")]
fn x86_instr() -> Option<private_gemm_x86::InstrSet> {
    use crate::cpu::{simd, Simd};
    match simd() {
        Simd::Avx512 => Some(private_gemm_x86::InstrSet::Avx512),
        Simd::Avx2 => Some(private_gemm_x86::InstrSet::Avx256),
        Simd::Portable => None,
    }
}
