//! Pre-tokenizers of byte-level BPE vocabularies: the regex lists llama.cpp applies for each
//! `tokenizer.ggml.pre` value.
//!
//! llama.cpp applies the regexes of a list one after another: each regex splits every fragment
//! left by the previous one, and the text between two matches stays a fragment of its own. Some
//! of its regexes run through hand-written matchers (GPT-2, LLaMA 3) or through `std::regex` over
//! a text whose non-ASCII code points are collapsed to one byte per Unicode category; both are
//! equivalent to the plain Unicode regex evaluated here with fancy-regex (backtracking, leftmost
//! alternative first, like ECMAScript).

use crate::TokenizerError;
use fancy_regex::Regex;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Same as LLAMA3 but digits one at a time.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What a `tokenizer.ggml.pre` value implies (llama.cpp's `llama_vocab::impl::load`).
pub(crate) struct PreConfig {
    pub regexes: &'static [&'static str],
    /// A whole pre-token that is itself a vocabulary entry is emitted without running merges.
    pub ignore_merges: bool,
    /// Default of `add_bos` before `tokenizer.ggml.add_bos_token` overrides it.
    pub add_bos: bool,
    /// Detokenizer removes spaces before punctuation and some contractions.
    pub clean_spaces: bool,
}

const fn cfg(
    regexes: &'static [&'static str],
    ignore_merges: bool,
    add_bos: bool,
    clean_spaces: bool,
) -> PreConfig {
    PreConfig {
        regexes,
        ignore_merges,
        add_bos,
        clean_spaces,
    }
}

const R_DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"];
const R_GPT2: &[&str] = &[GPT2];
const R_LLAMA3: &[&str] = &[LLAMA3];
const R_QWEN2: &[&str] = &[QWEN2];
const R_SMOLLM: &[&str] = &[r"\p{N}", GPT2];
const R_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"];

/// Every `tokenizer.ggml.pre` value accepted, grouped as llama.cpp groups them.
const TABLE: &[(&[&str], PreConfig)] = &[
    (&["default", ""], cfg(R_DEFAULT, false, false, true)),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        cfg(R_LLAMA3, true, true, true),
    ),
    (&["dbrx", "smaug-bpe"], cfg(R_LLAMA3, false, false, true)),
    (
        &["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"],
        cfg(R_QWEN2, false, false, false),
    ),
    (&["stablelm2", "megrez"], cfg(R_QWEN2, false, false, true)),
    (&["smollm", "command-r"], cfg(R_SMOLLM, false, false, false)),
    (
        &[
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        cfg(R_SMOLLM, false, false, true),
    ),
    (
        // "gpt2" is not a name llama.cpp knows; accepted as an alias of "gpt-2".
        &[
            "gpt-2",
            "gpt2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
        ],
        cfg(R_GPT2, false, false, true),
    ),
    (
        &["trillion", "granite-docling"],
        cfg(R_GPT2, false, false, false),
    ),
    (&["falcon"], cfg(R_FALCON, false, false, true)),
];

pub(crate) fn config_for(name: &str) -> Option<&'static PreConfig> {
    TABLE
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|(_, c)| c)
}

/// The accepted names, for error messages.
pub(crate) fn supported_names() -> String {
    TABLE
        .iter()
        .flat_map(|(names, _)| names.iter())
        .filter(|n| !n.is_empty())
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A compiled regex list.
pub(crate) struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn new(config: &PreConfig) -> Result<PreTokenizer, TokenizerError> {
        let regexes = config
            .regexes
            .iter()
            .map(|r| {
                Regex::new(r).map_err(|e| TokenizerError::Regex(format!("compiling {r:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(PreTokenizer { regexes })
    }

    /// Byte ranges of the pre-tokens of `text`, in order, covering all of it.
    pub fn split(&self, text: &str) -> Result<Vec<(usize, usize)>, TokenizerError> {
        let mut frags = vec![(0, text.len())];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(frags.len() * 2);
            for &(s, e) in &frags {
                // Match inside the fragment only, so a lookahead never sees past its end
                // (llama.cpp runs each regex on one fragment at a time).
                let sub = &text[s..e];
                let mut last = 0;
                for m in re.find_iter(sub) {
                    let m = m.map_err(|e| TokenizerError::Regex(e.to_string()))?;
                    if m.start() == m.end() {
                        continue;
                    }
                    if m.start() > last {
                        next.push((s + last, s + m.start()));
                    }
                    next.push((s + m.start(), s + m.end()));
                    last = m.end();
                }
                if last < sub.len() {
                    next.push((s + last, e));
                }
            }
            frags = next;
        }
        frags.retain(|&(s, e)| e > s);
        Ok(frags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let p = PreTokenizer::new(config_for(pre).unwrap()).unwrap();
        p.split(text)
            .unwrap()
            .into_iter()
            .map(|(s, e)| text[s..e].to_string())
            .collect()
    }

    #[test]
    fn qwen2_splits_digits_singly_llama3_in_threes() {
        assert_eq!(
            words("qwen2", "x 12345"),
            ["x", " ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(words("llama-bpe", "x 12345"), ["x", " ", "123", "45"]);
    }

    #[test]
    fn smollm_isolates_digits_before_gpt2_regex() {
        // The \p{N} pass leaves " " alone, so the space does not join the digit.
        assert_eq!(words("smollm", "a 12 b"), ["a", " ", "1", "2", " b"]);
        assert_eq!(words("gpt-2", "a 12 b"), ["a", " 12", " b"]);
    }

    #[test]
    fn whitespace_before_word_keeps_last_space_for_the_word() {
        assert_eq!(words("gpt-2", "a   b"), ["a", "  ", " b"]);
        assert_eq!(words("qwen2", "a\n\n  b"), ["a", "\n\n", " ", " b"]);
    }

    #[test]
    fn long_runs_do_not_fail() {
        // Backtracking regexes must not hit fancy-regex's backtrack limit on long runs.
        let texts = [
            " ".repeat(300_000) + "a",
            "\n ".repeat(100_000),
            "x".repeat(300_000),
            "9".repeat(100_000),
            "!?".repeat(100_000) + "\n\n",
            " \t".repeat(100_000) + "b",
        ];
        for pre in ["qwen2", "llama-bpe", "smollm", "gpt-2", "default", "falcon"] {
            let p = PreTokenizer::new(config_for(pre).unwrap()).unwrap();
            for t in &texts {
                let words = p.split(t).unwrap_or_else(|e| panic!("{pre}: {e}"));
                assert_eq!(words.last().map(|w| w.1), Some(t.len()));
            }
        }
    }
}
