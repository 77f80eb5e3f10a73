//! SentencePiece (`tokenizer.ggml.model = "llama"`) as llama.cpp runs it: start from one symbol
//! per UTF-8 character, repeatedly merge the adjacent pair whose concatenation is the
//! highest-scoring vocabulary entry (ties: leftmost), and spell any symbol left outside the
//! vocabulary as byte tokens `<0xNN>`.

use crate::vocab::Vocab;
use crate::TokenizerError;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Text `▁` stands for a space in SentencePiece vocabularies.
pub(crate) const SPACE_MARK: &str = "\u{2581}";

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Bytes; 0 once merged into its left neighbour.
    len: usize,
    prev: isize,
    next: isize,
}

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Bigram {
    /// Score as a totally ordered key, treating -0.0 as 0.0 like a float comparison would.
    fn key(&self) -> f32 {
        if self.score.is_nan() {
            f32::NEG_INFINITY
        } else {
            self.score + 0.0
        }
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    // Max-heap: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.key()
            .total_cmp(&other.key())
            .then(other.left.cmp(&self.left))
    }
}

/// Tokenize `text` (spaces already escaped to `▁`), appending ids to `out`.
pub(crate) fn encode(
    text: &str,
    vocab: &Vocab,
    scores: &[f32],
    byte_tokens: &[Option<u32>; 256],
    out: &mut Vec<u32>,
) -> Result<(), TokenizerError> {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, ch)) in text.char_indices().enumerate() {
        symbols.push(Symbol {
            start,
            len: ch.len_utf8(),
            prev: i as isize - 1,
            next: i as isize + 1,
        });
    }
    let Some(last) = symbols.last_mut() else {
        return Ok(());
    };
    last.next = -1;

    let mut queue = BinaryHeap::new();
    let try_add =
        |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, left: isize, right: isize| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (symbols[left as usize], symbols[right as usize]);
            // Live neighbours are contiguous in `text`, so the pair is one slice.
            let piece = &text[l.start..l.start + l.len + r.len];
            if let Some(id) = vocab.id(piece) {
                queue.push(Bigram {
                    score: scores.get(id as usize).copied().unwrap_or(0.0),
                    left: left as usize,
                    right: right as usize,
                    size: piece.len(),
                });
            }
        };

    for i in 1..symbols.len() as isize {
        try_add(&symbols, &mut queue, i - 1, i);
    }

    while let Some(bigram) = queue.pop() {
        let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
        // Stale: one side was merged away or grew since this pair was queued.
        if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
            continue;
        }
        symbols[bigram.left].len += r.len;
        symbols[bigram.right].len = 0;
        symbols[bigram.left].next = r.next;
        if r.next >= 0 {
            symbols[r.next as usize].prev = bigram.left as isize;
        }
        let prev = symbols[bigram.left].prev;
        let next = symbols[bigram.left].next;
        try_add(&symbols, &mut queue, prev, bigram.left as isize);
        try_add(&symbols, &mut queue, bigram.left as isize, next);
    }

    // Merged symbols are always vocabulary entries; only single characters can be missing, and
    // those fall back to their bytes.
    for sym in symbols.iter().filter(|s| s.len > 0) {
        let piece = &text[sym.start..sym.start + sym.len];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => {
                for &byte in piece.as_bytes() {
                    let id =
                        byte_tokens[byte as usize].ok_or(TokenizerError::NoByteToken { byte })?;
                    out.push(id);
                }
            }
        }
    }
    Ok(())
}

/// Byte-fallback token of each byte: `<0xNN>`, else the byte itself as text (llama.cpp's
/// `byte_to_token` for SentencePiece vocabularies).
pub(crate) fn byte_tokens(vocab: &Vocab) -> [Option<u32>; 256] {
    let mut table = [None; 256];
    for (byte, slot) in table.iter_mut().enumerate() {
        *slot = vocab.id(&format!("<0x{byte:02X}>")).or_else(|| {
            // A single byte is text only below 0x80.
            (byte < 0x80)
                .then(|| vocab.id(&(byte as u8 as char).to_string()))
                .flatten()
        });
    }
    table
}
