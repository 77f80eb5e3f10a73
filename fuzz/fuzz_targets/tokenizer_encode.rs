//! Arbitrary text (lossy UTF-8 of the input) through fixed small tokenizers of both kinds.
//!
//! Checked for every tokenizer and both `parse_special` settings: ids are in the vocabulary,
//! decode and the stream decoder succeed, and the tokens' pieces (control texts included)
//! concatenate back to the input where the vocabulary can represent it exactly. For the
//! byte-level BPE vocabulary without space clean-up (pre-tokenizer "qwen2"), and the
//! SentencePiece one without a space prefix, `decode(encode(text)) == text` must hold.
#![no_main]

use edgelm_gguf::GgufFile;
use edgelm_tokenizer::{StreamDecoder, Tokenizer, Encode};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Case {
    name: &'static str,
    tok: Tokenizer,
    /// Pieces rendered with control texts concatenate to the input.
    pieces_round_trip: bool,
    /// `decode(encode(text, parse_special = false)) == text`, and the stream decoder agrees.
    decode_round_trip: bool,
    /// The round trips hold only for text without `▁` (SentencePiece turns it into a space).
    spm: bool,
}

fn cases() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        let load = |w: edgelm_gguf::GgufWriter| {
            let file = GgufFile::from_bytes(w.to_bytes()).expect("seed vocabulary parses");
            Tokenizer::from_gguf(&file).expect("seed vocabulary loads")
        };
        let case = |name, w, pieces_round_trip, decode_round_trip, spm| Case {
            name,
            tok: load(w),
            pieces_round_trip,
            decode_round_trip,
            spm,
        };
        use edgelm_fuzz::{bpe_vocab, spm_vocab};
        vec![
            case("bpe/qwen2", bpe_vocab("qwen2"), true, true, false),
            case("bpe/llama-bpe", bpe_vocab("llama-bpe"), true, false, false),
            case("bpe/default", bpe_vocab("default"), true, false, false),
            case("spm/no-prefix", spm_vocab(false), true, true, true),
            case("spm/prefix", spm_vocab(true), false, false, true),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text: &str = &text;
    for case in cases() {
        let tok = &case.tok;
        let exact = !case.spm || !text.contains('\u{2581}');
        for parse_special in [false, true] {
            let ids = tok
                .encode(text, Encode { add_special: false, parse_special: parse_special })
                .unwrap_or_else(|e| panic!("{}: encode failed: {e}", case.name));
            for &id in &ids {
                assert!((id as usize) < tok.vocab_size(), "{}: id {id}", case.name);
            }
            let decoded = tok.decode(&ids).expect("ids from encode decode");
            let mut stream = StreamDecoder::new(tok);
            let mut streamed: String = ids.iter().map(|&id| stream.push(id)).collect();
            streamed.push_str(&stream.flush());

            if case.pieces_round_trip && exact {
                let pieces: Vec<u8> = ids
                    .iter()
                    .flat_map(|&id| tok.token_piece_bytes_special(id).unwrap().iter().copied())
                    .collect();
                assert!(
                    pieces == text.as_bytes(),
                    "{} (parse_special = {parse_special}): pieces of {ids:?} are {:?}, input {text:?}",
                    case.name,
                    String::from_utf8_lossy(&pieces)
                );
            }
            if case.decode_round_trip && exact {
                assert_eq!(streamed, decoded, "{}: stream decoder disagrees", case.name);
                if !parse_special {
                    assert_eq!(
                        decoded, text,
                        "{}: decode(encode(text)) differs; ids {ids:?}",
                        case.name
                    );
                }
            }
        }
        // BOS/EOS as the metadata says must not break anything either.
        let ids = tok
            .encode(text, Encode::PROMPT)
            .expect("encode with add_special");
        tok.decode(&ids).expect("decode with add_special");
    }
});
