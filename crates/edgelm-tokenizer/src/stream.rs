//! Incremental detokenization for streaming generated text.

use crate::Tokenizer;
use std::ops::Deref;

/// Turns token ids into text as they are generated, emitting only complete UTF-8.
///
/// A character may be split across tokens (byte-fallback `<0xNN>` tokens, or byte-level BPE
/// tokens holding part of a multi-byte character); its leading bytes are held back until the rest
/// arrives. Bytes that can never become valid UTF-8 are emitted as U+FFFD. Control and unknown
/// tokens render as nothing (llama.cpp's `token_to_piece` with `special = false`); ids outside the
/// vocabulary are ignored. Unlike [`Tokenizer::decode`], no leading space is stripped and no
/// spaces are cleaned up: the text is the plain concatenation of the pieces, since a stream
/// usually continues a prompt.
///
/// `T` is how the decoder holds the tokenizer: a borrow, or an `Arc` where the decoder lives in
/// a long-running sequence.
pub struct StreamDecoder<T: Deref<Target = Tokenizer>> {
    tokenizer: T,
    pending: Vec<u8>,
}

impl<T: Deref<Target = Tokenizer>> StreamDecoder<T> {
    pub fn new(tokenizer: T) -> StreamDecoder<T> {
        StreamDecoder {
            tokenizer,
            pending: Vec::new(),
        }
    }

    /// Add one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        if let Some(piece) = self.tokenizer.token_piece_bytes(id) {
            self.pending.extend_from_slice(piece);
        }
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was validated, so this converts without replacements.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        // Invalid bytes: they will never complete, emit a replacement.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        out
    }

    /// End of stream: returns whatever is held back, invalid bytes replaced by U+FFFD.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }
}
