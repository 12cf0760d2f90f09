//! The one CPU-feature check of the workspace: which instruction sets the kernels may use.
//!
//! Detected once per process. `SUPPORTLM_SIMD=portable|avx2|avx512` caps the level (never above what the
//! CPU has), so the AVX2 path can be measured on an AVX-512 machine and the portable path anywhere.

use std::sync::OnceLock;

/// Instruction-set levels the kernels are written for, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Plain Rust (any CPU).
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The above plus AVX-512F.
    Avx512,
}

impl Simd {
    /// The name `SUPPORTLM_SIMD` and the benchmarks use.
    pub fn as_str(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Simd> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "none" => Some(Simd::Portable),
            "avx2" => Some(Simd::Avx2),
            "avx512" | "avx-512" => Some(Simd::Avx512),
            _ => None,
        }
    }
}

/// What the CPU reports (x86-64 only; all `false` elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    /// AVX2.
    pub avx2: bool,
    /// Fused multiply-add.
    pub fma: bool,
    /// f16 ↔ f32 conversions.
    pub f16c: bool,
    /// AVX-512 Foundation.
    pub avx512f: bool,
}

impl CpuFeatures {
    /// The features of this CPU.
    pub fn detect() -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx2: std::is_x86_feature_detected!("avx2"),
                fma: std::is_x86_feature_detected!("fma"),
                f16c: std::is_x86_feature_detected!("f16c"),
                avx512f: std::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuFeatures::default()
    }

    /// The highest level these features allow.
    pub fn level(self) -> Simd {
        let avx2 = self.avx2 && self.fma && self.f16c;
        match (avx2, self.avx512f) {
            (true, true) => Simd::Avx512,
            (true, false) => Simd::Avx2,
            _ => Simd::Portable,
        }
    }
}

/// The level every kernel uses: the CPU's, capped by `SUPPORTLM_SIMD` when that is set (an unknown
/// value is ignored with a warning).
pub fn simd() -> Simd {
    static LEVEL: OnceLock<Simd> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cpu = CpuFeatures::detect().level();
        match std::env::var("SUPPORTLM_SIMD") {
            Ok(v) => match Simd::parse(&v) {
                Some(cap) => cap.min(cpu),
                None => {
                    tracing::warn!(
                        value = v.as_str(),
                        "SUPPORTLM_SIMD is not one of portable, avx2, avx512: ignored"
                    );
                    cpu
                }
            },
            Err(_) => cpu,
        }
    })
}

/// Size of the last-level (L3) cache of CPU 0 in bytes, from Linux's sysfs (`None` elsewhere or when
/// the machine has no L3).
pub fn l3_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok()?;
    parse_cache_size(&text)
}

/// `"49152K"`, `"32M"` or a plain byte count.
fn parse_cache_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: usize = digits.parse().ok()?;
    let scale = match unit.trim() {
        "" => 1,
        "K" | "KB" | "KiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        _ => return None,
    };
    Some(n * scale)
}

/// Bytes per second read from memory by every rayon thread at once, streaming through a buffer of `bytes`
/// (the fastest of `reps` passes). With `bytes` several times the L3 size this is the DRAM read
/// bandwidth a decode step, which reads every weight once, is bounded by.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let words = vec![1u64; bytes.div_ceil(8).max(8)];
    let chunk = words.len().div_ceil(rayon::current_num_threads().max(1));
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        let x = words
            .par_chunks(chunk)
            .map(|c| {
                // Eight independent lanes: the loop vectorizes and keeps several loads in flight.
                let mut lanes = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for i in 0..8 {
                        lanes[i] ^= w[i];
                    }
                }
                lanes.iter().fold(0, |a, b| a ^ b)
            })
            .reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(x);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words.len() * 8) as f64 / best
}

/// Whether the AVX2 + FMA paths run ([`simd`] at least [`Simd::Avx2`]).
#[inline]
pub fn avx2_fma() -> bool {
    simd() >= Simd::Avx2
}

/// Defines `fn $name(args)` that runs `$body` compiled for AVX2 + FMA when [`avx2_fma`] says so (loops
/// then vectorize 8 wide) and as plain code otherwise. Results may differ between the two in the last
/// bits (fused multiply-adds), never between runs on one machine.
#[macro_export]
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::cpu::avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_need_every_feature_of_their_set() {
        let all = CpuFeatures {
            avx2: true,
            fma: true,
            f16c: true,
            avx512f: true,
        };
        assert_eq!(all.level(), Simd::Avx512);
        assert_eq!(
            CpuFeatures {
                avx512f: false,
                ..all
            }
            .level(),
            Simd::Avx2
        );
        assert_eq!(CpuFeatures { fma: false, ..all }.level(), Simd::Portable);
        assert_eq!(CpuFeatures::default().level(), Simd::Portable);
    }

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("49152K\n"), Some(49152 << 10));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("1024"), Some(1024));
        assert_eq!(parse_cache_size("lots"), None);
    }

    #[test]
    fn the_override_parses_every_level_name() {
        for level in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
            assert_eq!(Simd::parse(level.as_str()), Some(level));
        }
        assert_eq!(Simd::parse("sse9"), None);
    }
}
