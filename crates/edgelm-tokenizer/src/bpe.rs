//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) as llama.cpp runs it: every pre-token's bytes
//! are spelled with GPT-2's byte-to-character table, then adjacent symbols are merged by the rank
//! of their pair in `tokenizer.ggml.merges` (lowest rank first, ties: leftmost).
//!
//! Merge lookups work on interned ids instead of strings: every vocabulary entry keeps its token
//! id, and the few merge halves that are not vocabulary entries get ids past the vocabulary.

use crate::pretok::PreTokenizer;
use crate::vocab::Vocab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::OnceLock;

const NONE: u32 = u32::MAX;

/// Queued pair: (rank, left index, right index, left id, right id); popped smallest first.
type QueuedPair = Reverse<(u32, usize, usize, u32, u32)>;

/// GPT-2's table: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        *slot = if printable {
            b as u8 as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// Inverse of [`byte_to_char_table`].
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    static INVERSE: OnceLock<[u16; 0x144]> = OnceLock::new();
    let inverse = INVERSE.get_or_init(|| {
        // 0x100 marks "no byte"; every mapped character is below U+0144.
        let mut inv = [0x100u16; 0x144];
        for (b, c) in byte_to_char_table().iter().enumerate() {
            inv[*c as usize] = b as u16;
        }
        inv
    });
    let v = *inverse.get(c as usize)?;
    u8::try_from(v).ok()
}

pub(crate) struct BpeModel {
    pub pre: PreTokenizer,
    pub ignore_merges: bool,
    n_vocab: u32,
    /// (left id, right id) → (rank, id of the concatenation).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Interned id of each byte's one-character spelling, or NONE.
    byte_sym: [u32; 256],
    byte_char: [char; 256],
}

struct Symbol {
    id: u32,
    start: usize,
    /// Bytes of the original word; 0 once merged into its left neighbour.
    len: usize,
    prev: isize,
    next: isize,
}

impl BpeModel {
    /// `merges` are the `"left right"` strings in rank order.
    pub fn new<'a>(
        pre: PreTokenizer,
        ignore_merges: bool,
        vocab: &Vocab,
        n_vocab: u32,
        merges: impl Iterator<Item = &'a str>,
    ) -> BpeModel {
        let mut extra: HashMap<String, u32> = HashMap::new();
        let mut intern = |s: &str| -> u32 {
            if let Some(id) = vocab.id(s) {
                return id;
            }
            let next = n_vocab + extra.len() as u32;
            *extra.entry(s.to_owned()).or_insert(next)
        };
        let mut table = HashMap::new();
        for (rank, line) in merges.enumerate() {
            // Split at the first space after the first byte, as llama.cpp does; a line without
            // one can never match a symbol pair.
            let Some(pos) = line.as_bytes().iter().skip(1).position(|&b| b == b' ') else {
                continue;
            };
            let (left, right) = (&line[..pos + 1], &line[pos + 2..]);
            let key = (intern(left), intern(right));
            let merged = intern(&format!("{left}{right}"));
            // The first of duplicate lines keeps its rank.
            table.entry(key).or_insert((rank as u32, merged));
        }
        let byte_char = byte_to_char_table();
        let mut byte_sym = [NONE; 256];
        for (b, slot) in byte_sym.iter_mut().enumerate() {
            let s = byte_char[b].to_string();
            *slot = vocab
                .id(&s)
                .or_else(|| extra.get(&s).copied())
                .unwrap_or(NONE);
        }
        BpeModel {
            pre,
            ignore_merges,
            n_vocab,
            merges: table,
            byte_sym,
            byte_char,
        }
    }

    /// Encode one pre-token (raw UTF-8 bytes), appending ids to `out`.
    pub fn encode_word(&self, word: &[u8], vocab: &Vocab, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            let spelled: String = word.iter().map(|&b| self.byte_char[b as usize]).collect();
            if let Some(id) = vocab.id(&spelled) {
                out.push(id);
                return;
            }
        }
        let mut syms: Vec<Symbol> = word
            .iter()
            .enumerate()
            .map(|(i, &b)| Symbol {
                id: self.byte_sym[b as usize],
                start: i,
                len: 1,
                prev: i as isize - 1,
                next: if i + 1 == word.len() {
                    -1
                } else {
                    i as isize + 1
                },
            })
            .collect();

        // Lowest rank first, then the leftmost pair.
        let mut queue: BinaryHeap<QueuedPair> = BinaryHeap::new();
        let add = |syms: &[Symbol], queue: &mut BinaryHeap<_>, left: isize, right: isize| {
            if left < 0 || right < 0 {
                return;
            }
            let (a, b) = (syms[left as usize].id, syms[right as usize].id);
            if a == NONE || b == NONE {
                return;
            }
            if let Some(&(rank, _)) = self.merges.get(&(a, b)) {
                queue.push(Reverse((rank, left as usize, right as usize, a, b)));
            }
        };
        for i in 1..syms.len() as isize {
            add(&syms, &mut queue, i - 1, i);
        }
        while let Some(Reverse((_, left, right, a, b))) = queue.pop() {
            // Stale if either side changed since queued (symbols only grow, so equal ids mean
            // equal text).
            if syms[left].len == 0
                || syms[right].len == 0
                || syms[left].id != a
                || syms[right].id != b
            {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(a, b)) else {
                continue;
            };
            let right_len = syms[right].len;
            let right_next = syms[right].next;
            syms[left].id = merged;
            syms[left].len += right_len;
            syms[right].len = 0;
            syms[left].next = right_next;
            if right_next >= 0 {
                syms[right_next as usize].prev = left as isize;
            }
            let prev = syms[left].prev;
            add(&syms, &mut queue, prev, left as isize);
            add(&syms, &mut queue, left as isize, right_next);
        }

        for sym in syms.iter().filter(|s| s.len > 0) {
            if sym.id < self.n_vocab {
                out.push(sym.id);
                continue;
            }
            // Not a vocabulary entry: llama.cpp looks up each byte of the spelled symbol as a
            // one-byte token and drops the bytes that are none (only ASCII spellings can be).
            for &b in &word[sym.start..sym.start + sym.len] {
                let c = self.byte_char[b as usize];
                if c.is_ascii() {
                    if let Some(id) = vocab.id(c.encode_utf8(&mut [0; 4])) {
                        out.push(id);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s_and_invertible() {
        let t = byte_to_char_table();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xAD], 'Ń');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(t[b as usize]), Some(b));
        }
        assert_eq!(char_to_byte('中'), None);
    }
}
