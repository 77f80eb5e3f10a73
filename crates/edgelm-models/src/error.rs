use edgelm_gguf::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] edgelm_gguf::GgufError),
    #[error(transparent)]
    Kernel(#[from] edgelm_kernels::KernelError),
    #[error("architecture {0:?} is not supported; edgelm runs: {list}", list = crate::SUPPORTED_ARCHITECTURES.join(", "))]
    UnknownArchitecture(String),
    #[error(
        "tensor {0:?} is missing from the model file; the file is incomplete or not a {1} model"
    )]
    MissingTensor(String, String),
    #[error("tensor {name:?} has shape {got:?}, expected {expected}")]
    Shape {
        name: String,
        got: Vec<u64>,
        expected: String,
    },
    #[error("tensor {name:?} has type {ty}, which edgelm cannot compute with yet")]
    UnsupportedType { name: String, ty: GgmlType },
    #[error("metadata {key:?}: {reason}")]
    Metadata { key: String, reason: String },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("invalid KV cache settings: {0}")]
    KvConfig(String),
    #[error("the KV cache is full: all {blocks} blocks of {block_len} positions are held by running sequences; finish or free some, or give the cache a larger budget")]
    KvFull { blocks: usize, block_len: usize },
    #[error("sequence {0} is not allocated in this KV cache")]
    UnknownSequence(usize),
    #[error("cannot cut sequence {seq} back to {len} positions: {reason}")]
    Truncate {
        seq: usize,
        len: usize,
        reason: String,
    },
    #[error("context full: sequence {seq} would reach {needed} tokens but the context holds {n_ctx}; raise --ctx or shorten the input")]
    ContextFull {
        seq: usize,
        needed: usize,
        n_ctx: usize,
    },
    #[error("cannot shift the context (keep {keep}, drop {discard}): {reason}")]
    ContextShift {
        keep: usize,
        discard: usize,
        reason: String,
    },
    #[error("the saved KV state cannot be restored here: {0}")]
    KvState(String),
    /// The memory planner's refusal, with what would fit (`DoesNotFit`'s message).
    #[error("{0}")]
    DoesNotFit(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
