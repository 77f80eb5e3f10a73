//! Tokenizers read from GGUF metadata that give the same token ids as llama.cpp.
//!
//! Two vocabulary types are supported:
//! - `tokenizer.ggml.model = "llama"`: SentencePiece with scores (e.g. Gemma 3, LLaMA 2), encoded
//!   with llama.cpp's bigram-merge algorithm and `<0xNN>` byte fallback;
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with ranked merges (e.g. Qwen 2.5, SmolLM 2,
//!   LLaMA 3), with the pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre`.
//!
//! Both first cut the text at special-token occurrences (control and unknown tokens only with
//! `parse_special`, user-defined tokens always), like llama.cpp's `llama_tokenize`. Token
//! attributes, special ids and the end-of-generation set are derived the way llama.cpp's vocabulary
//! loader derives them, including its text-based detection of tokens such as `<|im_end|>`.

#![forbid(unsafe_code)]

mod bpe;
mod error;
mod pretok;
mod special;
mod spm;
mod stream;
mod vocab;

pub use error::TokenizerError;
pub use stream::StreamDecoder;

use edgelm_gguf::{Array, GgufFile};
use special::{Fragment, SpecialTokens};
use vocab::Vocab;

// Token attributes (llama.cpp's `llama_token_attr` bits that matter here).
pub(crate) const ATTR_UNKNOWN: u8 = 1 << 0;
pub(crate) const ATTR_UNUSED: u8 = 1 << 1;
pub(crate) const ATTR_NORMAL: u8 = 1 << 2;
pub(crate) const ATTR_CONTROL: u8 = 1 << 3;
pub(crate) const ATTR_USER_DEFINED: u8 = 1 << 4;
pub(crate) const ATTR_BYTE: u8 = 1 << 5;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Texts llama.cpp treats as end-of-generation tokens (and forces to control type).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Special roles llama.cpp fills from metadata or, failing that, by token text. Each found token
/// is forced to control type.
struct Role {
    keys: &'static [&'static str],
    texts: &'static [&'static str],
}

const ROLE_EOT: Role = Role {
    keys: &["tokenizer.ggml.eot_token_id"],
    texts: &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ],
};
const ROLE_EOM: Role = Role {
    keys: &["tokenizer.ggml.eom_token_id"],
    texts: &["<|eom_id|>"],
};
const ROLE_FIM_PRE: Role = Role {
    keys: &[
        "tokenizer.ggml.fim_pre_token_id",
        "tokenizer.ggml.prefix_token_id",
    ],
    texts: &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ],
};
const ROLE_FIM_SUF: Role = Role {
    keys: &[
        "tokenizer.ggml.fim_suf_token_id",
        "tokenizer.ggml.suffix_token_id",
    ],
    texts: &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ],
};
const ROLE_FIM_MID: Role = Role {
    keys: &[
        "tokenizer.ggml.fim_mid_token_id",
        "tokenizer.ggml.middle_token_id",
    ],
    texts: &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ],
};
const ROLE_FIM_PAD: Role = Role {
    keys: &["tokenizer.ggml.fim_pad_token_id"],
    texts: &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
};
const ROLE_FIM_REP: Role = Role {
    keys: &["tokenizer.ggml.fim_rep_token_id"],
    texts: &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
};
const ROLE_FIM_SEP: Role = Role {
    keys: &["tokenizer.ggml.fim_sep_token_id"],
    texts: &["<|file_sep|>"],
};

/// Which algorithm the vocabulary uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabType {
    /// `tokenizer.ggml.model = "llama"`.
    SentencePiece,
    /// `tokenizer.ggml.model = "gpt2"`.
    BytePairEncoding,
}

/// How [`Tokenizer::encode`] treats the text's edges and special-token text (llama.cpp's
/// `add_special` and `parse_special`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encode {
    /// Add BOS / EOS where the model's metadata says to.
    pub add_special: bool,
    /// Control-token texts written in the text (`<|im_start|>`) become those single tokens;
    /// user-defined tokens always do.
    pub parse_special: bool,
}

impl Encode {
    /// A whole prompt, as llama.cpp's tools take one: BOS / EOS added, special-token text parsed.
    pub const PROMPT: Encode = Encode {
        add_special: true,
        parse_special: true,
    };
    /// A piece of text: nothing added, special-token text kept as text.
    pub const TEXT: Encode = Encode {
        add_special: false,
        parse_special: false,
    };
}

/// A model's tokenizer, built from its GGUF metadata. Cheap to share (`&Tokenizer` is all
/// encoding and decoding need).
pub struct Tokenizer {
    vocab_type: VocabType,
    pre_name: Option<String>,
    vocab: Vocab,
    scores: Vec<f32>,
    attrs: Vec<u8>,
    /// Piece of every token with control texts rendered (`token_to_piece(.., special = true)`),
    /// all concatenated; `piece_offsets[i]..piece_offsets[i + 1]` is token i's.
    piece_data: Vec<u8>,
    piece_offsets: Vec<usize>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    eog: Vec<u32>,
    special: SpecialTokens,
    spm_byte_tokens: [Option<u32>; 256],
    bpe: Option<bpe::BpeModel>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_type", &self.vocab_type)
            .field("pre", &self.pre_name)
            .field("vocab_size", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

fn bad(key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::BadKey {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn opt_str<'f>(file: &'f GgufFile, key: &str) -> Result<Option<&'f str>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            bad(
                key,
                format!("expected a string, found {}", v.display_short()),
            )
        }),
    }
}

fn opt_bool(file: &GgufFile, key: &str) -> Result<Option<bool>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            bad(
                key,
                format!("expected a boolean, found {}", v.display_short()),
            )
        }),
    }
}

fn opt_u64(file: &GgufFile, key: &str) -> Result<Option<u64>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            bad(
                key,
                format!(
                    "expected a non-negative integer, found {}",
                    v.display_short()
                ),
            )
        }),
    }
}

fn opt_array<'f>(file: &'f GgufFile, key: &str) -> Result<Option<&'f Array>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_array().map(Some).ok_or_else(|| {
            bad(
                key,
                format!("expected an array, found {}", v.display_short()),
            )
        }),
    }
}

/// A special-token id from metadata: an id outside the vocabulary is ignored and the default
/// kept, as llama.cpp does.
fn special_id(
    file: &GgufFile,
    keys: &[&str],
    default: Option<u32>,
    n: usize,
) -> Result<Option<u32>, TokenizerError> {
    let mut id = default.filter(|&d| (d as usize) < n);
    for key in keys {
        if let Some(v) = opt_u64(file, key)? {
            if v < n as u64 {
                id = Some(v as u32);
            }
        }
    }
    Ok(id)
}

impl Tokenizer {
    /// Build the tokenizer from a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = opt_str(file, KEY_MODEL)?.ok_or(TokenizerError::MissingKey {
            key: KEY_MODEL,
            hint: "the file has no tokenizer; use a GGUF converted with its tokenizer",
        })?;
        let vocab_type = match model {
            "llama" => VocabType::SentencePiece,
            "gpt2" => VocabType::BytePairEncoding,
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };

        // Vocabulary.
        let raw_tokens = opt_array(file, KEY_TOKENS)?.ok_or(TokenizerError::MissingKey {
            key: KEY_TOKENS,
            hint: "the file has no vocabulary; re-convert the model with its tokenizer",
        })?;
        let n = raw_tokens.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(bad(KEY_TOKENS, format!("implausible vocabulary size {n}")));
        }
        if let Some(i) = (0..n).find(|&i| raw_tokens.str_at(i).is_none()) {
            return Err(bad(KEY_TOKENS, format!("entry {i} is not a string")));
        }
        // llama.cpp renames empty entries so that they cannot match text. Duplicate texts: the
        // first id wins (llama.cpp's map keeps the first insertion).
        let vocab = Vocab::new((0..n).map(|i| match raw_tokens.str_at(i) {
            Some(s) if !s.is_empty() => std::borrow::Cow::Borrowed(s),
            _ => std::borrow::Cow::Owned(format!("[EMPTY_{i}]")),
        }));
        let scores = match opt_array(file, KEY_SCORES)? {
            None => vec![0.0; n],
            Some(a) if a.len() < n => {
                return Err(bad(
                    KEY_SCORES,
                    format!("{} scores for {n} tokens", a.len()),
                ))
            }
            Some(a) => (0..n)
                .map(|i| {
                    a.get(i)
                        .and_then(|v| v.as_f64())
                        .map(|x| x as f32)
                        .ok_or_else(|| bad(KEY_SCORES, format!("entry {i} is not a number")))
                })
                .collect::<Result<_, _>>()?,
        };
        let mut attrs = match opt_array(file, KEY_TYPES)? {
            None => vec![ATTR_NORMAL; n],
            Some(a) if a.len() < n => {
                return Err(bad(
                    KEY_TYPES,
                    format!("{} token types for {n} tokens", a.len()),
                ))
            }
            Some(a) => (0..n)
                .map(|i| {
                    let t = a
                        .get(i)
                        .and_then(|v| v.as_i64())
                        .ok_or_else(|| bad(KEY_TYPES, format!("entry {i} is not an integer")))?;
                    Ok(match t {
                        1 => ATTR_NORMAL,
                        2 => ATTR_UNKNOWN,
                        3 => ATTR_CONTROL,
                        4 => ATTR_USER_DEFINED,
                        5 => ATTR_UNUSED,
                        6 => ATTR_BYTE,
                        // Undefined: rendered as nothing, never produced by text.
                        _ => 0,
                    })
                })
                .collect::<Result<_, TokenizerError>>()?,
        };

        // Type-dependent defaults, then metadata overrides (llama.cpp's loader).
        let pre_name = opt_str(file, KEY_PRE)?.map(str::to_owned);
        let (
            mut add_bos,
            mut add_space_prefix,
            clean_spaces,
            default_bos,
            default_eos,
            default_unk,
        );
        let mut bpe = None;
        match vocab_type {
            VocabType::SentencePiece => {
                add_bos = true;
                add_space_prefix = true;
                clean_spaces = false;
                (default_bos, default_eos, default_unk) = (Some(1), Some(2), Some(0));
            }
            VocabType::BytePairEncoding => {
                let name = pre_name.as_deref().unwrap_or("default");
                let config = pretok::config_for(name).ok_or_else(|| {
                    TokenizerError::UnknownPreTokenizer {
                        name: name.to_owned(),
                        supported: pretok::supported_names(),
                    }
                })?;
                add_bos = config.add_bos;
                add_space_prefix = false;
                clean_spaces = config.clean_spaces;
                // llama.cpp's BPE defaults (id 11 is Falcon's <|endoftext|>); models set their own.
                (default_bos, default_eos, default_unk) = (Some(11), Some(11), None);
                let merges = opt_array(file, KEY_MERGES)?.ok_or(TokenizerError::MissingKey {
                    key: KEY_MERGES,
                    hint: "a \"gpt2\" (BPE) tokenizer needs its merge list; re-convert the model",
                })?;
                let merges = (0..merges.len())
                    .map(|i| {
                        merges
                            .str_at(i)
                            .ok_or_else(|| bad(KEY_MERGES, format!("entry {i} is not a string")))
                    })
                    .collect::<Result<Vec<&str>, _>>()?;
                let pre = pretok::PreTokenizer::new(config)?;
                bpe = Some(bpe::BpeModel::new(
                    pre,
                    config.ignore_merges,
                    &vocab,
                    n as u32,
                    merges.into_iter(),
                ));
            }
        }
        if let Some(v) = opt_bool(file, KEY_ADD_PREFIX)? {
            add_space_prefix = v;
        }
        let bos = special_id(file, &[KEY_BOS], default_bos, n)?;
        let eos = special_id(file, &[KEY_EOS], default_eos, n)?;
        let _unk = special_id(file, &["tokenizer.ggml.unknown_token_id"], default_unk, n)?;
        if let Some(v) = opt_bool(file, KEY_ADD_BOS)? {
            add_bos = v;
        }
        let add_eos = opt_bool(file, KEY_ADD_EOS)?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: KEY_ADD_BOS,
                id_key: KEY_BOS,
            });
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: KEY_ADD_EOS,
                id_key: KEY_EOS,
            });
        }

        // Roles found by text are forced to control type. Ascending id order stands in for
        // llama.cpp's hash-map order (which only matters when several candidates exist).
        let find_role = |role: &Role, attrs: &mut [u8]| -> Result<Option<u32>, TokenizerError> {
            if let Some(id) = special_id(file, role.keys, None, n)? {
                return Ok(Some(id));
            }
            for (i, t) in vocab.iter().enumerate() {
                // The cheap text test first: the hash lookup then runs for a handful of tokens.
                if role.texts.contains(&t) && vocab.id(t) == Some(i as u32) {
                    attrs[i] |= ATTR_CONTROL;
                    return Ok(Some(i as u32));
                }
            }
            Ok(None)
        };
        let eot = find_role(&ROLE_EOT, &mut attrs)?;
        let eom = find_role(&ROLE_EOM, &mut attrs)?;
        for role in [&ROLE_FIM_PRE, &ROLE_FIM_SUF, &ROLE_FIM_MID] {
            find_role(role, &mut attrs)?;
        }
        let fim_pad = find_role(&ROLE_FIM_PAD, &mut attrs)?;
        let fim_rep = find_role(&ROLE_FIM_REP, &mut attrs)?;
        let fim_sep = find_role(&ROLE_FIM_SEP, &mut attrs)?;

        let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for (i, t) in vocab.iter().enumerate() {
            if EOG_TEXTS.contains(&t) {
                eog.push(i as u32);
                attrs[i] |= ATTR_CONTROL;
            }
            // gpt-oss: these must always be rendered.
            if matches!(
                t,
                "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
            ) {
                attrs[i] = ATTR_USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        let has = |eog: &[u32], text: &str| eog.iter().find(|&&i| vocab.text(i) == text).copied();
        // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        if let Some(end) = has(&eog, "<|end|>") {
            let call = has(&eog, "<|call|>").or(has(&eog, "<|calls|>")).is_some();
            if call && (has(&eog, "<|return|>").is_some() || has(&eog, "<|flush|>").is_some()) {
                eog.retain(|&i| i != end);
                attrs[end as usize] = ATTR_USER_DEFINED;
            }
        }
        // Gemma 4 and PLaMo have an ordinary "</s>" (only PaddleOCR's ends generation).
        let normal_s_marker = has(&eog, "<|tool_response>").or(has(&eog, "<|plamo:eos|>"));
        if let (Some(_), Some(s)) = (normal_s_marker, has(&eog, "</s>")) {
            eog.retain(|&i| i != s);
            attrs[s as usize] = ATTR_NORMAL;
        }

        let special = SpecialTokens::new(&vocab, &attrs);
        let spm_byte_tokens = match vocab_type {
            VocabType::SentencePiece => spm::byte_tokens(&vocab),
            VocabType::BytePairEncoding => [None; 256],
        };
        let chat_template = opt_str(file, KEY_CHAT_TEMPLATE)?.map(str::to_owned);

        let mut tok = Tokenizer {
            vocab_type,
            pre_name,
            vocab,
            scores,
            attrs,
            piece_data: Vec::new(),
            piece_offsets: Vec::new(),
            bos,
            eos,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            eog,
            special,
            spm_byte_tokens,
            bpe,
            chat_template,
        };
        tok.build_pieces();
        Ok(tok)
    }

    fn build_pieces(&mut self) {
        let mut data = Vec::with_capacity(self.vocab.len() * 6);
        let mut offsets = Vec::with_capacity(self.vocab.len() + 1);
        offsets.push(0);
        for (text, &attr) in self.vocab.iter().zip(&self.attrs) {
            if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
                data.extend_from_slice(text.as_bytes());
            } else if attr & ATTR_NORMAL != 0 {
                match self.vocab_type {
                    VocabType::SentencePiece => {
                        data.extend_from_slice(text.replace(spm::SPACE_MARK, " ").as_bytes())
                    }
                    VocabType::BytePairEncoding => {
                        for c in text.chars() {
                            match bpe::char_to_byte(c) {
                                Some(b) => data.push(b),
                                // llama.cpp's marker for a character outside GPT-2's table.
                                None => {
                                    data.extend_from_slice(b"[UNK_BYTE_0x");
                                    for b in c.encode_utf8(&mut [0; 4]).bytes() {
                                        data.extend_from_slice(format!("{b:02x}").as_bytes());
                                    }
                                    data.extend_from_slice(text.as_bytes());
                                    data.push(b']');
                                }
                            }
                        }
                    }
                }
            } else if attr & ATTR_BYTE != 0 {
                data.push(byte_token_value(text));
            }
            // Unused and undefined tokens render as nothing.
            offsets.push(data.len());
        }
        self.piece_data = data;
        self.piece_offsets = offsets;
    }

    /// Encode `text` as `how` says (see [`Encode`]).
    pub fn encode(&self, text: &str, how: Encode) -> Result<Vec<u32>, TokenizerError> {
        let Encode {
            add_special,
            parse_special,
        } = how;
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.push(self.bos.ok_or(TokenizerError::MissingSpecialToken {
                flag: KEY_ADD_BOS,
                id_key: KEY_BOS,
            })?);
        }
        let frags = self
            .special
            .partition(text, &self.vocab, &self.attrs, parse_special);
        match (&self.bpe, self.vocab_type) {
            (Some(bpe), VocabType::BytePairEncoding) => {
                for frag in frags {
                    match frag {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(s, e) => {
                            let piece = &text[s..e];
                            for (ws, we) in bpe.pre.split(piece)? {
                                bpe.encode_word(&piece.as_bytes()[ws..we], &self.vocab, &mut out);
                            }
                        }
                    }
                }
            }
            _ => {
                // A space is prefixed to the text at the start and after every special token.
                let mut prev_special = true;
                let mut buf = String::new();
                for frag in frags {
                    match frag {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(s, e) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push(' ');
                            }
                            buf.push_str(&text[s..e]);
                            let escaped = buf.replace(' ', spm::SPACE_MARK);
                            spm::encode(
                                &escaped,
                                &self.vocab,
                                &self.scores,
                                &self.spm_byte_tokens,
                                &mut out,
                            )?;
                            prev_special = false;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.push(self.eos.ok_or(TokenizerError::MissingSpecialToken {
                flag: KEY_ADD_EOS,
                id_key: KEY_EOS,
            })?);
        }
        Ok(out)
    }

    /// Decode ids to text like llama.cpp's `llama_detokenize(.., remove_special = false,
    /// unparse_special = false)`: control and unknown tokens render as nothing; with
    /// `add_space_prefix` the first token's leading space is dropped (the one the encoder
    /// added); BPE vocabularies whose pre-tokenizer asks for it get llama.cpp's space clean-up
    /// (" ." → ".", " 's" → "'s", …). Bytes that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            let piece = self
                .token_piece_bytes(id)
                .ok_or(TokenizerError::TokenIdOutOfRange {
                    id,
                    vocab_size: self.vocab.len(),
                })?;
            let piece = match piece {
                [b' ', rest @ ..] if i == 0 && self.add_space_prefix => rest,
                p => p,
            };
            bytes.extend_from_slice(piece);
        }
        if self.clean_spaces {
            bytes = clean_spaces(&bytes);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Raw bytes a token stands for in text: byte tokens give their byte, SentencePiece `▁` is a
    /// space, byte-level BPE characters map back to their bytes. Control and unknown tokens give
    /// an empty piece (see [`Tokenizer::token_piece_bytes_special`]). `None` if `id` is outside
    /// the vocabulary. A piece may be part of a UTF-8 character.
    pub fn token_piece_bytes(&self, id: u32) -> Option<&[u8]> {
        let attr = *self.attrs.get(id as usize)?;
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
            return Some(&[]);
        }
        self.token_piece_bytes_special(id)
    }

    /// Like [`Tokenizer::token_piece_bytes`] but control and unknown tokens give their text
    /// (llama.cpp's `token_to_piece` with `special = true`).
    pub fn token_piece_bytes_special(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let (start, end) = (*self.piece_offsets.get(i)?, *self.piece_offsets.get(i + 1)?);
        self.piece_data.get(start..end)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn vocab_type(&self) -> VocabType {
        self.vocab_type
    }

    /// `tokenizer.ggml.pre` as stored, if any.
    pub fn pre_tokenizer(&self) -> Option<&str> {
        self.pre_name.as_deref()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode` with `add_special` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode` with `add_special` ends with EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether generation should stop at `id`.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The model's end-of-generation tokens, sorted: EOS, EOT, EOM, FIM pad/repo/separator tokens
    /// and tokens whose text llama.cpp recognizes as such (`<|im_end|>`, `<end_of_turn>`,
    /// `<|endoftext|>`, `<|eot_id|>`, `</s>`, …).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` is a control token (not rendered by default, parsed only with
    /// `parse_special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & ATTR_CONTROL != 0)
    }

    /// `tokenizer.chat_template`, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The token's vocabulary text as stored (`▁` and GPT-2 byte characters not decoded).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.get_text(id)
    }

    /// The id whose vocabulary text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }
}

/// Value of a `<0xNN>` token (llama.cpp parses the two characters after `<0x` leniently).
fn byte_token_value(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..).unwrap_or(&[]);
    let mut v: u32 = 0;
    for &d in digits.iter().take(2) {
        match (d as char).to_digit(16) {
            Some(x) => v = v * 16 + x,
            None => break,
        }
    }
    v as u8
}

/// llama.cpp's detokenizer clean-up for BPE vocabularies: drop the space before `?!.,`, around a
/// lone apostrophe (" ' "), and before the contractions 's 'm 're 've.
fn clean_spaces(text: &[u8]) -> Vec<u8> {
    // Pass 1: " ?" " !" " ." " ," lose the space.
    let mut a = Vec::with_capacity(text.len());
    for (i, &x) in text.iter().enumerate() {
        if i > 0 && text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            a.pop();
        }
        a.push(x);
    }
    // Pass 2: " ' " becomes "'"; the character after the removed space then no longer sees a
    // space before it (llama.cpp overwrites that space with NUL).
    let mut b = Vec::with_capacity(a.len());
    let mut i = 0;
    let mut zeroed = usize::MAX;
    while i < a.len() {
        let x = a[i];
        if i > 0 {
            let prev = if zeroed == i - 1 { 0 } else { a[i - 1] };
            if x == b'\'' && i + 1 < a.len() && prev == b' ' && a[i + 1] == b' ' {
                b.pop();
                b.push(x);
                zeroed = i + 1;
                i += 2;
                continue;
            }
        }
        b.push(x);
        i += 1;
    }
    // Pass 3: " 's" " 'm" " 're" " 've" lose the space.
    let mut c = Vec::with_capacity(b.len());
    for (i, &x) in b.iter().enumerate() {
        if i > 0 && b[i - 1] == b' ' && x == b'\'' && i + 1 < b.len() {
            let x1 = b[i + 1];
            let x2 = b.get(i + 2).copied();
            if matches!(x1, b's' | b'm')
                || matches!((x1, x2), (b'r', Some(b'e')) | (b'v', Some(b'e')))
            {
                c.pop();
            }
        }
        c.push(x);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_spaces_matches_llama_cpp_rules() {
        let t = |s: &str| String::from_utf8(clean_spaces(s.as_bytes())).unwrap();
        assert_eq!(t("Hello , world !"), "Hello, world!");
        assert_eq!(t("it 's he 'll we 're"), "it's he 'll we're");
        assert_eq!(t("a ' b"), "a'b");
        assert_eq!(t("x"), "x");
        assert_eq!(t(""), "");
    }

    #[test]
    fn byte_token_values() {
        assert_eq!(byte_token_value("<0x0A>"), 10);
        assert_eq!(byte_token_value("<0xFF>"), 255);
        assert_eq!(byte_token_value("<0x"), 0);
    }
}
