//! One forward call for every use: each token carries its sequence, position and whether its
//! logits or its final hidden state (for embeddings) are wanted.

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub seqs: Vec<usize>,
    pub want_logits: Vec<bool>,
    /// Whether the final hidden state (after the output norm) of each token is wanted.
    pub want_embd: Vec<bool>,
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
        self.want_embd.push(false);
    }

    /// A token whose final hidden state is wanted (`embd`) instead of its logits.
    pub fn push_embd(&mut self, token: u32, pos: usize, seq: usize, embd: bool) {
        self.tokens.push(token);
        self.positions.push(pos);
        self.seqs.push(seq);
        self.want_logits.push(false);
        self.want_embd.push(embd);
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
        self.want_embd.clear();
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Logits, and final hidden states, for the batch positions that asked for them, in batch
/// order.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    /// Index in the batch of each row.
    pub batch_index: Vec<usize>,
    pub n_vocab: usize,
    pub data: Vec<f32>,
    /// Index in the batch of each hidden-state row.
    pub embd_index: Vec<usize>,
    pub n_embd: usize,
    /// Hidden states after the output norm (what the output head would read), `n_embd` a row.
    pub embd: Vec<f32>,
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

    pub fn embd_row(&self, i: usize) -> &[f32] {
        &self.embd[i * self.n_embd..(i + 1) * self.n_embd]
    }

    /// The hidden state of batch position `b`, if it was wanted.
    pub fn embd_for_batch_index(&self, b: usize) -> Option<&[f32]> {
        self.embd_index
            .binary_search(&b)
            .ok()
            .map(|i| self.embd_row(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_stay_in_step_and_clear_together() {
        let mut b = Batch::new();
        b.push(1, 0, 0, true);
        b.push_embd(2, 0, 1, true);
        b.push_embd(3, 1, 1, false);
        assert_eq!(b.want_logits, [true, false, false]);
        assert_eq!(b.want_embd, [false, true, false]);
        b.clear();
        assert!(b.is_empty() && b.want_logits.is_empty() && b.want_embd.is_empty());
    }
}
