//! Which instruction set the kernels use, chosen once at start.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the reference every SIMD path is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (every AVX2 CPU has F16C; the kernels convert scales with it).
    Avx2,
    /// AVX2 plus AVX-VNNI (256-bit VEX `vpdpbusd`: Intel's client cores since Alder Lake, AMD's
    /// since Zen 4): the legacy formats' interleaved kernels use it, everything else is AVX2's.
    AvxVnni,
    /// AVX2 plus AVX-512 F/BW/VL with VNNI; types without a 512-bit kernel use the AVX2 one.
    Avx512,
}

#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    #[error("EDGELM_ISA={0:?} is not known: use scalar, avx2, avxvnni or avx512")]
    Unknown(String),
    #[error("EDGELM_ISA={0} was asked for but this CPU lacks it (detected: {1})")]
    Unsupported(Isa, Isa),
}

impl Isa {
    /// The best path this CPU runs: AVX-512 before AVX-VNNI (twice the width), AVX-VNNI
    /// before AVX2.
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::AvxVnni, Isa::Avx2]
            .into_iter()
            .find(|i| i.runs_here())
            .unwrap_or(Isa::Scalar)
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
                    "avxvnni" => Isa::AvxVnni,
                    "avx512" => Isa::Avx512,
                    _ => return Err(IsaError::Unknown(s)),
                };
                if want.runs_here() {
                    Ok(want)
                } else {
                    Err(IsaError::Unsupported(want, best))
                }
            }
        }
    }

    /// Every path this CPU can run, for tests (AVX-VNNI and AVX-512 each where the CPU has
    /// them: a CPU may have either without the other).
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512]
            .into_iter()
            .filter(|i| i.runs_here())
            .collect()
    }

    /// Whether this CPU has everything the path uses.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::AvxVnni => avx2 && has!("avxvnni"),
                Isa::Avx512 => {
                    avx2 && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                        && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
        })
    }
}
