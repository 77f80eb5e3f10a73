//! Errors: each says what was wrong and what to do about it.

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key {key:?} is missing: {hint}")]
    MissingKey {
        key: &'static str,
        hint: &'static str,
    },

    #[error(
        "GGUF metadata key {key:?} is malformed: {reason}; the tokenizer metadata is corrupt or was \
         written by an unusual converter (re-convert the model with llama.cpp's convert_hf_to_gguf.py)"
    )]
    BadKey { key: String, reason: String },

    #[error(
        "unsupported tokenizer model {0:?} (key \"tokenizer.ggml.model\"): edgelm supports \"llama\" \
         (SentencePiece) and \"gpt2\" (byte-level BPE); use a model with one of those tokenizers"
    )]
    UnsupportedModel(String),

    #[error(
        "unknown pre-tokenizer {name:?} (key \"tokenizer.ggml.pre\"); supported: {supported}. \
         Use a model whose pre-tokenizer is one of these, or add its split regexes to edgelm-tokenizer"
    )]
    UnknownPreTokenizer { name: String, supported: String },

    #[error(
        "{flag} is true but {id_key} is not set (or out of range), so the tokenizer cannot add that \
         token; fix the model's metadata or encode with add_special = false"
    )]
    MissingSpecialToken {
        flag: &'static str,
        id_key: &'static str,
    },

    #[error(
        "token id {id} is outside the vocabulary (size {vocab_size}); these ids do not belong to \
         this model's tokenizer"
    )]
    TokenIdOutOfRange { id: u32, vocab_size: usize },

    #[error(
        "the vocabulary has no byte-fallback token for byte 0x{byte:02X} (neither <0x{byte:02X}> nor \
         the raw byte), so this text cannot be encoded with this model; remove that character"
    )]
    NoByteToken { byte: u8 },

    #[error(
        "the pre-tokenizer regex failed on this input ({0}); split the text into smaller pieces \
         (e.g. very long runs of one character) and encode them separately"
    )]
    Regex(String),
}
