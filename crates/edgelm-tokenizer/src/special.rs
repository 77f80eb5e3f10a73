//! Splitting text at special-token occurrences before the vocabulary's own algorithm runs
//! (llama.cpp's `tokenizer_st_partition`).
//!
//! llama.cpp takes the special tokens longest text first and, for each, cuts every remaining text
//! fragment at all its (non-overlapping, leftmost) occurrences. A vocabulary can hold thousands of
//! such tokens (Gemma 3: ~6400), so a byte trie first finds which of them occur in the text at all;
//! only those run the cutting pass, in llama.cpp's order, which gives the same fragments.

use crate::vocab::Vocab;
use crate::{ATTR_CONTROL, ATTR_UNKNOWN, ATTR_USER_DEFINED};
use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment {
    /// Byte range of the input text still to be tokenized.
    Text(usize, usize),
    Token(u32),
}

#[derive(Default)]
struct Node {
    children: Vec<(u8, u32)>,
    token: Option<u32>,
}

pub(crate) struct SpecialTokens {
    /// Control, user-defined and unknown tokens: longest text first, then by id (llama.cpp's sort
    /// leaves equal lengths in unspecified order; this makes it deterministic).
    order: Vec<u32>,
    trie: Vec<Node>,
}

impl SpecialTokens {
    pub fn new(vocab: &Vocab, attrs: &[u8]) -> SpecialTokens {
        let mut order: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&i| attrs[i as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
            .collect();
        order.sort_by(|&a, &b| {
            vocab
                .text(b)
                .len()
                .cmp(&vocab.text(a).len())
                .then(a.cmp(&b))
        });
        let mut trie = vec![Node::default()];
        for &id in &order {
            let mut node = 0usize;
            for &byte in vocab.text(id).as_bytes() {
                node = match trie[node].children.iter().find(|(b, _)| *b == byte) {
                    Some(&(_, child)) => child as usize,
                    None => {
                        trie.push(Node::default());
                        let child = trie.len() - 1;
                        trie[node].children.push((byte, child as u32));
                        child
                    }
                };
            }
            // Duplicate texts cannot occur (the vocabulary maps text to one id); keep the first.
            trie[node].token.get_or_insert(id);
        }
        SpecialTokens { order, trie }
    }

    /// Ids of special tokens whose text occurs somewhere in `text`.
    fn occurring(&self, text: &str) -> HashSet<u32> {
        let bytes = text.as_bytes();
        let mut found = HashSet::new();
        for start in 0..bytes.len() {
            let mut node = 0usize;
            for &byte in &bytes[start..] {
                match self.trie[node].children.iter().find(|(b, _)| *b == byte) {
                    Some(&(_, child)) => node = child as usize,
                    None => break,
                }
                if let Some(id) = self.trie[node].token {
                    found.insert(id);
                }
            }
        }
        found
    }

    /// Cut `text` into raw-text fragments and special tokens. Without `parse_special`, control and
    /// unknown tokens stay text; user-defined tokens are always cut out (as llama.cpp and HF do).
    pub fn partition(
        &self,
        text: &str,
        vocab: &Vocab,
        attrs: &[u8],
        parse_special: bool,
    ) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        let present = self.occurring(text);
        if present.is_empty() {
            return frags;
        }
        for &id in &self.order {
            if !present.contains(&id) {
                continue;
            }
            if !parse_special && attrs[id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = vocab.text(id);
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(s, e) = frag else {
                    next.push(frag);
                    continue;
                };
                let mut pos = s;
                for (m, _) in text[s..e].match_indices(needle) {
                    let at = s + m;
                    if at > pos {
                        next.push(Fragment::Text(pos, at));
                    }
                    next.push(Fragment::Token(id));
                    pos = at + needle.len();
                }
                if pos < e {
                    next.push(Fragment::Text(pos, e));
                }
            }
            frags = next;
        }
        frags
    }
}
