//! The vocabulary: every token's text in one buffer, and an open-addressing index from a text to
//! the first id that has it (llama.cpp's map keeps the first of duplicate texts). Held as
//! `Vec<String>` plus `HashMap<String, u32>`, a 262k-token vocabulary took ~25 MB; this ~5 MB.

const EMPTY: u32 = u32::MAX;

pub(crate) struct Vocab {
    text: String,
    /// `ends[i]` is where token i's text ends in `text`.
    ends: Vec<u32>,
    /// Token ids by hash, linear probing; a power of two at least twice the vocabulary.
    slots: Vec<u32>,
}

/// FNV-1a: short keys, no attacker-chosen collisions that matter (the vocabulary is fixed).
fn hash(s: &[u8]) -> u64 {
    s.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Vocab {
    pub fn new<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Vocab {
        let mut text = String::new();
        let mut ends = Vec::new();
        for t in tokens {
            text.push_str(t.as_ref());
            ends.push(text.len() as u32);
        }
        let size = (2 * ends.len()).next_power_of_two().max(2);
        let mut v = Vocab {
            text,
            ends,
            slots: vec![EMPTY; size],
        };
        for id in 0..v.ends.len() as u32 {
            let (slot, found) = v.probe(v.text(id));
            if found.is_none() {
                v.slots[slot] = id;
            }
        }
        v
    }

    /// The slot where `s` is or would go, and the id found there.
    fn probe(&self, s: &str) -> (usize, Option<u32>) {
        let mask = self.slots.len() - 1;
        let mut i = hash(s.as_bytes()) as usize & mask;
        loop {
            match self.slots[i] {
                EMPTY => return (i, None),
                id if self.text(id) == s => return (i, Some(id)),
                _ => i = (i + 1) & mask,
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Token `id`'s text; `id < len()`.
    pub fn text(&self, id: u32) -> &str {
        let i = id as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    pub fn get_text(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.len()).then(|| self.text(id))
    }

    /// The first id whose text is `s`.
    pub fn id(&self, s: &str) -> Option<u32> {
        self.probe(s).1
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len() as u32).map(|id| self.text(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_first_duplicate_wins() {
        let v = Vocab::new(["a", "bb", "", "a", "ccc"]);
        assert_eq!(v.len(), 5);
        assert_eq!((v.text(1), v.text(2), v.text(4)), ("bb", "", "ccc"));
        assert_eq!(v.id("a"), Some(0));
        assert_eq!(v.id(""), Some(2));
        assert_eq!(v.id("ccc"), Some(4));
        assert_eq!(v.id("c"), None);
        assert_eq!(v.get_text(5), None);
        let many: Vec<String> = (0..10_000).map(|i| format!("t{i}")).collect();
        let v = Vocab::new(&many);
        assert!(many
            .iter()
            .enumerate()
            .all(|(i, t)| v.id(t) == Some(i as u32)));
        assert_eq!(v.iter().count(), 10_000);
    }
}
