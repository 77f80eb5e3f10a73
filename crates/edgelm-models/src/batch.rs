//! One forward call for every use: each token carries its sequence, position and whether its
//! logits are wanted.

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub seqs: Vec<usize>,
    pub want_logits: Vec<bool>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn push(&mut self, token: u32, pos: usize, seq: usize, logits: bool) {
        self.tokens.push(token);
        self.positions.push(pos);
        self.seqs.push(seq);
        self.want_logits.push(logits);
    }

    /// Tokens of one sequence starting at `start`, logits for the last only (prefill) or all.
    pub fn from_tokens(tokens: &[u32], start: usize, seq: usize, all_logits: bool) -> Batch {
        let mut b = Batch::new();
        for (i, &t) in tokens.iter().enumerate() {
            b.push(t, start + i, seq, all_logits || i + 1 == tokens.len());
        }
        b
    }

    /// Empty the batch, keeping its memory (a decoding loop forms one per step).
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.positions.clear();
        self.seqs.clear();
        self.want_logits.clear();
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Logits for the batch positions that asked for them, in batch order.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    /// Index in the batch of each row.
    pub batch_index: Vec<usize>,
    pub n_vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.n_vocab..(i + 1) * self.n_vocab]
    }

    /// The row of batch position `b`, if its logits were wanted.
    pub fn for_batch_index(&self, b: usize) -> Option<&[f32]> {
        self.batch_index
            .iter()
            .position(|&x| x == b)
            .map(|i| self.row(i))
    }

    pub fn n_rows(&self) -> usize {
        self.batch_index.len()
    }
}
