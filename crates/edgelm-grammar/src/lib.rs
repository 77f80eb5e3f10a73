//! Constrained decoding. A [`GrammarCompiler`] holds llguidance's token trie over a model's
//! vocabulary (built once per model); it compiles a [`GrammarSpec`] — any JSON object, a JSON
//! schema, a tool-call grammar, or Lark text — into a [`Constraint`]: the per-sequence state that
//! says which tokens may come next. The scheduler asks it only when it must: a token sampled
//! without the mask that the grammar allows is taken as is (exact, see [`Constraint::allows`]),
//! and only a rejected one costs a full mask.

#![forbid(unsafe_code)]

mod tools;

pub use tools::{control_marker, tool_call_grammar, ToolChoice, ToolGrammar};

use edgelm_tokenizer::{Encode, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("the model's vocabulary cannot drive a grammar: {0}")]
    Vocabulary(String),
    #[error("the grammar cannot be compiled: {0}")]
    Compile(String),
    #[error("the grammar rejected the generated text: {0}")]
    Rejected(String),
}

/// What a constraint enforces.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A value valid under this JSON schema.
    JsonSchema(Value),
    /// llguidance's Lark-like grammar text.
    Lark(String),
}

/// Output layout the JSON grammars allow: Python's `json.dumps` spacing, which models have
/// seen most, and no free whitespace (a model cannot wander into endless newlines).
fn layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// A schema with edgelm's layout options attached (the caller's own `x-guidance`, if any, wins).
pub(crate) fn with_layout(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(layout);
    }
    schema
}

/// The token trie of one model's vocabulary and the grammar factory over it.
pub struct GrammarCompiler {
    factory: ParserFactory,
    eog: Arc<[u32]>,
}

struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // llguidance turns forced bytes into tokens here, and the tokens must spell exactly
        // those bytes. The model's tokenizer gives the canonical split, except where it adds
        // to the text (SentencePiece's space prefix, `▁` without a `▁` token); then the trie's
        // greedy split, which always spells the bytes.
        let spelled = |ids: &[u32]| {
            let mut bytes = Vec::with_capacity(s.len());
            for &id in ids {
                bytes.extend_from_slice(self.tokenizer.token_piece_bytes(id).unwrap_or_default());
            }
            bytes == s
        };
        std::str::from_utf8(s)
            .ok()
            .and_then(|text| self.tokenizer.encode(text, Encode::TEXT).ok())
            .filter(|ids| spelled(ids))
            .unwrap_or_else(|| self.trie.greedy_tokenize(s))
    }
}

impl GrammarCompiler {
    /// Build the trie from the GGUF vocabulary: each token's bytes as the text it stands for;
    /// control tokens (which render as nothing) as llguidance's special-token form, so a grammar
    /// can name them (`<|im_end|>`) but text never matches them.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<GrammarCompiler, GrammarError> {
        let n = tokenizer.vocab_size();
        let eos = tokenizer
            .eos()
            .or_else(|| tokenizer.eog_ids().first().copied())
            .ok_or_else(|| {
                GrammarError::Vocabulary("it has no end-of-sequence token".to_owned())
            })?;
        let mut words = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let word = if tokenizer.is_control(id) || tokenizer.is_eog(id) {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(tokenizer.token_piece_bytes_special(id).unwrap_or_default());
                w
            } else {
                tokenizer.token_piece_bytes(id).unwrap_or_default().to_vec()
            };
            words.push(word);
        }
        let mut info = TokRxInfo::new(n as u32, eos);
        info.tok_bos = tokenizer.bos();
        let trie = TokTrie::from(&info, &words);
        let eog: Arc<[u32]> = tokenizer.eog_ids().into();
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        // llguidance logs warnings to stderr by default; errors reach the caller instead.
        factory.set_stderr_log_level(0);
        Ok(GrammarCompiler { factory, eog })
    }

    /// Compile `spec` into a fresh constraint. Errors name what in the grammar is wrong.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, GrammarError> {
        let grammar = match spec {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(json!({"type": "object"})))
            }
            GrammarSpec::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(GrammarError::Compile(
                        "a JSON schema must be an object (or true / false)".to_owned(),
                    ));
                }
                TopLevelGrammar::from_json_schema(with_layout(schema.clone()))
            }
            GrammarSpec::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Compile(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Compile(e));
        }
        Ok(Constraint {
            matcher,
            eog: self.eog.clone(),
        })
    }
}

/// One sequence's position in a grammar.
pub struct Constraint {
    matcher: Matcher,
    eog: Arc<[u32]>,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
            eog: self.eog.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    fn is_eog(&self, token: u32) -> bool {
        self.eog.binary_search(&token).is_ok()
    }

    /// Whether `token` may come next: an end-of-generation token where the grammar can end,
    /// any other token where its bytes continue the grammar. Drawing from the unmasked
    /// distribution and keeping the draw when allowed is exact: rejection sampling gives the
    /// distribution restricted to the allowed tokens (a rejected draw is redrawn masked).
    pub fn allows(&mut self, token: u32) -> bool {
        if self.is_eog(token) {
            return self.can_end();
        }
        if self.matcher.is_stopped() {
            return false;
        }
        matches!(self.matcher.validate_tokens(&[token]), Ok(1))
    }

    /// Whether the text so far is a complete sentence of the grammar.
    pub fn can_end(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// Nothing more may follow: the grammar is complete.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Set the logits of every token the grammar forbids to −∞. Returns how many remain
    /// allowed (0: the grammar is stuck, which a well-formed grammar never is).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<usize, GrammarError> {
        let can_end = self.can_end();
        let mask = if self.matcher.is_stopped() {
            None
        } else {
            let m = self
                .matcher
                .compute_mask()
                .map_err(|e| GrammarError::Rejected(e.to_string()))?;
            Some(m)
        };
        let mut allowed = 0;
        for (t, l) in logits.iter_mut().enumerate() {
            let t = t as u32;
            let ok = if self.eog.binary_search(&t).is_ok() {
                can_end
            } else {
                // Ids past the tokenizer's vocabulary (padding rows of the output matrix) are
                // never text.
                mask.as_ref()
                    .is_some_and(|m| (t as usize) < m.len() && m.is_allowed(t))
            };
            if ok {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(allowed)
    }

    /// Advance past `token` (an end-of-generation token ends the grammar).
    pub fn commit(&mut self, token: u32) -> Result<(), GrammarError> {
        if self.is_eog(token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Rejected(e.to_string()))
    }
}

/// A sequence's constraint as the scheduler drives it: on from the start, or switched on when
/// the output ends with a trigger text (a tool call's opening marker) and off again when the
/// triggered grammar is complete, so free text may follow and another call may open.
#[derive(Debug, Clone)]
pub struct Guide {
    fresh: Constraint,
    trigger: Option<Vec<u8>>,
    active: Option<Constraint>,
    /// The output's last bytes, as long as the trigger, while waiting for it.
    tail: Vec<u8>,
}

impl Guide {
    pub fn new(constraint: Constraint, trigger: Option<String>) -> Guide {
        let trigger = trigger.filter(|t| !t.is_empty()).map(String::into_bytes);
        Guide {
            active: trigger.is_none().then(|| constraint.clone()),
            fresh: constraint,
            trigger,
            tail: Vec::new(),
        }
    }

    /// Whether the grammar holds now.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Whether `token` may come next (any token while the grammar is off).
    pub fn allows(&mut self, token: u32) -> bool {
        self.active.as_mut().is_none_or(|c| c.allows(token))
    }

    /// Mask forbidden tokens' logits (none while the grammar is off); returns how many remain.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<usize, GrammarError> {
        match self.active.as_mut() {
            Some(c) => c.mask(logits),
            None => Ok(logits.len()),
        }
    }

    /// Advance past `token`, whose text is `piece` (control tokens by their name).
    pub fn commit(&mut self, token: u32, piece: &[u8]) -> Result<(), GrammarError> {
        if let Some(c) = self.active.as_mut() {
            c.commit(token)?;
            if self.trigger.is_some() && c.is_complete() {
                self.active = None;
            }
            return Ok(());
        }
        if let Some(trigger) = &self.trigger {
            self.tail.extend_from_slice(piece);
            if self.tail.ends_with(trigger) {
                self.tail.clear();
                self.active = Some(self.fresh.clone());
            } else if self.tail.len() > trigger.len() {
                self.tail.drain(..self.tail.len() - trigger.len());
            }
        }
        Ok(())
    }

    /// An untriggered grammar that is complete: the output must end here.
    pub fn is_complete(&self) -> bool {
        self.trigger.is_none() && self.active.as_ref().is_some_and(Constraint::is_complete)
    }
}

#[cfg(test)]
mod tests;
