//! Which instruction set the kernels use, chosen once at start.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the reference every SIMD path is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (every AVX2 CPU has F16C; the kernels convert scales with it).
    Avx2,
    /// AVX2 plus AVX-512 F/BW/VL with VNNI; types without a 512-bit kernel use the AVX2 one.
    Avx512,
}

#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    #[error("EDGELM_ISA={0:?} is not known: use scalar, avx2 or avx512")]
    Unknown(String),
    #[error("EDGELM_ISA={0} was asked for but this CPU lacks it (detected: {1})")]
    Unsupported(Isa, Isa),
}

impl Isa {
    /// The best path this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    /// `EDGELM_ISA` if set (and runnable here), otherwise the detected best.
    pub fn from_env() -> Result<Isa, IsaError> {
        let best = Isa::detect();
        match std::env::var("EDGELM_ISA") {
            Err(_) => Ok(best),
            Ok(s) => {
                let want = match s.to_ascii_lowercase().as_str() {
                    "scalar" => Isa::Scalar,
                    "avx2" => Isa::Avx2,
                    "avx512" => Isa::Avx512,
                    _ => return Err(IsaError::Unknown(s)),
                };
                if want.runs_on(best) {
                    Ok(want)
                } else {
                    Err(IsaError::Unsupported(want, best))
                }
            }
        }
    }

    /// Every path this CPU can run, for tests.
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.runs_on(best))
            .collect()
    }

    fn runs_on(self, best: Isa) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => matches!(best, Isa::Avx2 | Isa::Avx512),
            Isa::Avx512 => best == Isa::Avx512,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        })
    }
}
