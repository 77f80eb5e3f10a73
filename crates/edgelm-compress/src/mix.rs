//! Which type each tensor gets: the file types `edgelm quantize --type` accepts, and the mix
//! rules that spend more bits where a model is most sensitive.
//!
//! The rules are llama.cpp's (`llama_tensor_get_type` in its `src/llama-quant.cpp`), so a mix
//! name means the same tensor types in both tools and their KL divergences compare at equal
//! size. One deliberate difference: a 256-block type that does not fit a tensor's rows falls
//! back as llama.cpp's does (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, IQ4_XS → IQ4_NL), except
//! Q2_K and Q3_K, which take IQ4_NL rather than Q4_0: the same 4.5 bits per weight, less error.
//! And one more: where the `_M` mixes give a third of the layers more bits by position, as many
//! layers get them, but chosen by measured loss ([`extra_bits_by_layer`]).

use edgelm_gguf::GgmlType;

/// A file type: one weight type, or a named mix of them (`general.file_type` in GGUF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    IQ4_NL,
    IQ4_XS,
    Q2_K,
    Q2_K_S,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl FileType {
    pub const ALL: [FileType; 20] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::IQ4_NL,
        FileType::IQ4_XS,
        FileType::Q2_K,
        FileType::Q2_K_S,
        FileType::Q3_K_S,
        FileType::Q3_K_M,
        FileType::Q3_K_L,
        FileType::Q4_K_S,
        FileType::Q4_K_M,
        FileType::Q5_K_S,
        FileType::Q5_K_M,
        FileType::Q6_K,
    ];

    pub fn name(self) -> &'static str {
        use FileType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            Q8_0 => "Q8_0",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            IQ4_NL => "IQ4_NL",
            IQ4_XS => "IQ4_XS",
            Q2_K => "Q2_K",
            Q2_K_S => "Q2_K_S",
            Q3_K_S => "Q3_K_S",
            Q3_K_M => "Q3_K_M",
            Q3_K_L => "Q3_K_L",
            Q4_K_S => "Q4_K_S",
            Q4_K_M => "Q4_K_M",
            Q5_K_S => "Q5_K_S",
            Q5_K_M => "Q5_K_M",
            Q6_K => "Q6_K",
        }
    }

    /// A name as `llama-quantize` takes it, case-insensitive; `Q3_K`, `Q4_K` and `Q5_K` are
    /// its aliases of the `_M` mixes.
    pub fn parse(s: &str) -> Option<FileType> {
        let up = s.to_ascii_uppercase();
        let up = match up.as_str() {
            "Q3_K" => "Q3_K_M",
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            other => other,
        };
        FileType::ALL.into_iter().find(|t| t.name() == up)
    }

    /// llama.cpp's `llama_ftype` number, stored as `general.file_type`.
    pub fn id(self) -> u32 {
        use FileType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q8_0 => 7,
            Q5_0 => 8,
            Q5_1 => 9,
            Q2_K => 10,
            Q3_K_S => 11,
            Q3_K_M => 12,
            Q3_K_L => 13,
            Q4_K_S => 14,
            Q4_K_M => 15,
            Q5_K_S => 16,
            Q5_K_M => 17,
            Q6_K => 18,
            Q2_K_S => 21,
            IQ4_NL => 25,
            IQ4_XS => 30,
            BF16 => 32,
        }
    }

    /// The type of every quantized tensor the mix rules do not change.
    pub fn base(self) -> GgmlType {
        use FileType::*;
        match self {
            F32 => GgmlType::F32,
            F16 => GgmlType::F16,
            BF16 => GgmlType::BF16,
            Q8_0 => GgmlType::Q8_0,
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            Q5_1 => GgmlType::Q5_1,
            IQ4_NL => GgmlType::IQ4_NL,
            IQ4_XS => GgmlType::IQ4_XS,
            Q2_K | Q2_K_S => GgmlType::Q2_K,
            Q3_K_S | Q3_K_M | Q3_K_L => GgmlType::Q3_K,
            Q4_K_S | Q4_K_M => GgmlType::Q4_K,
            Q5_K_S | Q5_K_M => GgmlType::Q5_K,
            Q6_K => GgmlType::Q6_K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, FileType::F32 | FileType::F16 | FileType::BF16)
    }
}

/// Parses a single tensor type for `--tensor-type`, `--token-embedding-type` and
/// `--output-tensor-type` (case-insensitive GGML names).
pub fn parse_tensor_type(s: &str) -> Option<GgmlType> {
    let up = s.to_ascii_uppercase();
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(&up))
        .filter(|t| edgelm_quant::can_quantize(*t) && !matches!(t, GgmlType::Q8_1 | GgmlType::Q8_K))
}

/// The role of a tensor in the mix rules, from its GGUF name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    TokenEmbedding,
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnQkv,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    Other,
}

impl Role {
    pub fn of(name: &str) -> Role {
        let has = |s: &str| name.contains(s);
        if name == "token_embd.weight" {
            Role::TokenEmbedding
        } else if name == "output.weight" {
            Role::Output
        } else if has("attn_qkv.weight") {
            Role::AttnQkv
        } else if has("attn_q.weight") {
            Role::AttnQ
        } else if has("attn_k.weight") {
            Role::AttnK
        } else if has("attn_v.weight") {
            Role::AttnV
        } else if has("attn_output.weight") {
            Role::AttnOutput
        } else if has("ffn_gate.weight") {
            Role::FfnGate
        } else if has("ffn_up.weight") {
            Role::FfnUp
        } else if has("ffn_down.weight") {
            Role::FfnDown
        } else {
            Role::Other
        }
    }
}

/// Whether a tensor is a weight matrix the quantizer converts (llama.cpp's rule): 2-D or more,
/// named `*weight`, not a norm. Everything else is copied as it is.
pub fn is_quantizable(name: &str, n_dims: usize) -> bool {
    n_dims >= 2 && name.ends_with("weight") && !name.contains("_norm.weight")
}

/// Model facts the rules depend on.
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    pub n_layer: usize,
    /// Query heads per key/value head.
    pub n_gqa: usize,
    /// No separate `output.weight`: the embedding table is also the output head.
    pub tied_embeddings: bool,
}

/// User choices that override or switch off the rules.
#[derive(Clone, Copy, Debug, Default)]
pub struct Overrides {
    pub token_embedding: Option<GgmlType>,
    pub output: Option<GgmlType>,
    /// Every quantized tensor at the base type (only the row-length fallback applies).
    pub pure: bool,
    pub has_imatrix: bool,
}

/// Layers at the ends and every third in between: where the `_M` mixes spend more bits.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Where a mix gives some layers of a role a higher type by position (`use_more_bits`): that
/// type and the role's usual one. [`crate::quantize::plan`] keeps how many layers get it but
/// chooses which by measured rounding loss.
pub fn extra_bits_by_layer(ft: FileType, role: Role) -> Option<(GgmlType, GgmlType)> {
    match (ft, role) {
        (FileType::Q4_K_M | FileType::Q5_K_M, Role::AttnV | Role::FfnDown) => {
            Some((GgmlType::Q6_K, ft.base()))
        }
        _ => None,
    }
}

/// The layer index in a `blk.N.…` name.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The type a quantizable tensor `name` with rows of `cols` values gets under `ft`, before any
/// `--tensor-type` pattern (those replace the rules but not the row-length fallback: see
/// [`fit_rows`]).
pub fn rule_type(ft: FileType, name: &str, cols: usize, m: &ModelShape, o: &Overrides) -> GgmlType {
    use FileType as F;
    use GgmlType as G;
    let role = Role::of(name);
    if let (Role::TokenEmbedding, Some(t)) = (role, o.token_embedding) {
        return t;
    }
    if let (Role::Output, Some(t)) = (role, o.output) {
        return t;
    }
    let base = ft.base();
    if !ft.is_quantized() || o.pure {
        return base;
    }
    let layer = layer_of(name).unwrap_or(0);
    let n = m.n_layer.max(1);
    let output_like = role == Role::Output || (m.tied_embeddings && role == Role::TokenEmbedding);
    if output_like {
        if let Some(t) = o.output {
            return t;
        }
        return if !cols.is_multiple_of(base.block_elems()) || base == G::Q8_0 {
            G::Q8_0
        } else {
            G::Q6_K
        };
    }
    match role {
        Role::AttnV => match ft {
            F::Q2_K => {
                if m.n_gqa >= 4 {
                    G::Q4_K
                } else {
                    G::Q3_K
                }
            }
            F::Q2_K_S if m.n_gqa >= 4 => G::Q4_K,
            F::IQ4_NL | F::IQ4_XS if m.n_gqa >= 4 => G::Q5_K,
            F::Q3_K_M => {
                if layer < 2 {
                    G::Q5_K
                } else {
                    G::Q4_K
                }
            }
            F::Q3_K_L => G::Q5_K,
            F::Q4_K_M | F::Q5_K_M if use_more_bits(layer, n) => G::Q6_K,
            F::Q4_K_S if layer < 4 => G::Q5_K,
            _ => base,
        },
        Role::FfnDown => match ft {
            F::Q2_K => G::Q3_K,
            F::Q2_K_S if layer < n / 8 => G::Q4_K,
            F::Q3_K_M => {
                if layer < n / 16 {
                    G::Q5_K
                } else {
                    G::Q4_K
                }
            }
            F::Q3_K_L => G::Q5_K,
            F::Q4_K_M if use_more_bits(layer, n) => G::Q6_K,
            F::IQ4_NL | F::IQ4_XS if layer < n / 8 && !o.has_imatrix => G::Q5_K,
            F::Q5_K_M if use_more_bits(layer, n) => G::Q6_K,
            F::Q4_K_S if layer < n / 8 => G::Q5_K,
            F::Q4_0 if o.has_imatrix && layer < n / 8 => G::Q4_1,
            F::Q5_0 if o.has_imatrix && layer < n / 8 => G::Q5_1,
            _ => base,
        },
        Role::AttnOutput => match ft {
            F::Q2_K => G::Q3_K,
            F::Q3_K_M => G::Q4_K,
            F::Q3_K_L => G::Q5_K,
            _ => base,
        },
        Role::AttnQkv => match ft {
            F::Q3_K_M | F::Q3_K_L => G::Q4_K,
            F::Q4_K_M => G::Q5_K,
            F::Q5_K_M => G::Q6_K,
            _ => base,
        },
        _ => base,
    }
}

/// `ty`, or the type that takes its place when rows of `cols` values are not whole blocks of
/// it (see the module's note), or F16 when no block type fits.
pub fn fit_rows(ty: GgmlType, cols: usize) -> GgmlType {
    use GgmlType as G;
    if cols.is_multiple_of(ty.block_elems()) {
        return ty;
    }
    let fallback = match ty {
        G::IQ4_XS | G::Q2_K | G::Q3_K => G::IQ4_NL,
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(fallback.block_elems()) {
        fallback
    } else {
        G::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN: ModelShape = ModelShape {
        n_layer: 24,
        n_gqa: 7,
        tied_embeddings: true,
    };

    fn ty(ft: FileType, name: &str, cols: usize, o: &Overrides) -> GgmlType {
        fit_rows(rule_type(ft, name, cols, &QWEN, o), cols)
    }

    #[test]
    fn names_round_trip_and_aliases() {
        for ft in FileType::ALL {
            assert_eq!(FileType::parse(ft.name()), Some(ft));
            assert_eq!(FileType::parse(&ft.name().to_lowercase()), Some(ft));
        }
        assert_eq!(FileType::parse("Q4_K"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::parse("q3_k"), Some(FileType::Q3_K_M));
        assert_eq!(FileType::parse("Q7_K"), None);
        assert_eq!(parse_tensor_type("q6_k"), Some(GgmlType::Q6_K));
        assert_eq!(parse_tensor_type("q8_k"), None);
    }

    /// Qwen2.5-0.5B at Q4_K_M, as llama-quantize types it: the tied table Q8_0 (896 is not a
    /// multiple of 256), ffn_down Q6_K on the "more bits" layers (the first and last eighth,
    /// every third between: 0–2, 5, 8, …, 20, 21–23), attn_v likewise, Q4_K rows that do not
    /// fit 256 fall back to Q5_0.
    #[test]
    fn q4_k_m_on_qwen() {
        let o = Overrides::default();
        assert_eq!(
            ty(FileType::Q4_K_M, "token_embd.weight", 896, &o),
            GgmlType::Q8_0
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.0.ffn_down.weight", 4864, &o),
            GgmlType::Q6_K
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.4.ffn_down.weight", 4864, &o),
            GgmlType::Q4_K
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.5.ffn_down.weight", 4864, &o),
            GgmlType::Q6_K
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.23.ffn_down.weight", 4864, &o),
            GgmlType::Q6_K
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.0.attn_v.weight", 896, &o),
            GgmlType::Q8_0
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.6.attn_v.weight", 896, &o),
            GgmlType::Q5_0
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.5.attn_q.weight", 896, &o),
            GgmlType::Q5_0
        );
        assert_eq!(
            ty(FileType::Q2_K, "blk.5.attn_q.weight", 896, &o),
            GgmlType::IQ4_NL
        );
        assert_eq!(
            ty(FileType::Q4_0, "token_embd.weight", 896, &o),
            GgmlType::Q8_0
        );
        assert_eq!(
            ty(FileType::F16, "token_embd.weight", 896, &o),
            GgmlType::F16
        );
        // the Q4_0 guard against early ffn_down only with an importance matrix
        let im = Overrides {
            has_imatrix: true,
            ..o
        };
        assert_eq!(
            ty(FileType::Q4_0, "blk.1.ffn_down.weight", 4864, &o),
            GgmlType::Q4_0
        );
        assert_eq!(
            ty(FileType::Q4_0, "blk.1.ffn_down.weight", 4864, &im),
            GgmlType::Q4_1
        );
        let pure = Overrides { pure: true, ..o };
        assert_eq!(
            ty(FileType::Q4_K_M, "token_embd.weight", 896, &pure),
            GgmlType::Q5_0
        );
        assert_eq!(
            ty(FileType::Q4_K_M, "blk.0.ffn_down.weight", 4864, &pure),
            GgmlType::Q4_K
        );
        let emb = Overrides {
            token_embedding: Some(GgmlType::Q4_0),
            ..o
        };
        assert_eq!(
            ty(FileType::Q4_K_M, "token_embd.weight", 896, &emb),
            GgmlType::Q4_0
        );
        assert_eq!(fit_rows(GgmlType::Q4_0, 40), GgmlType::F16);
    }

    #[test]
    fn roles_and_quantizable() {
        assert_eq!(Role::of("blk.3.attn_v.weight"), Role::AttnV);
        assert_eq!(Role::of("blk.3.attn_v.bias"), Role::Other);
        assert!(is_quantizable("blk.3.ffn_up.weight", 2));
        assert!(!is_quantizable("blk.3.attn_norm.weight", 1));
        assert!(!is_quantizable("blk.3.attn_q_norm.weight", 2));
        assert!(!is_quantizable("blk.3.attn_q.bias", 2));
        assert_eq!(layer_of("blk.17.ffn_down.weight"), Some(17));
        assert_eq!(layer_of("output.weight"), None);
    }
}
