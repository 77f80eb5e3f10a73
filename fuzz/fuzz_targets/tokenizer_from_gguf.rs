//! Arbitrary bytes as GGUF, then as tokenizer metadata: building the tokenizer must return Ok or
//! Err, and a built tokenizer must encode, decode and stream-decode without panicking.
#![no_main]

use edgelm_gguf::GgufFile;
use edgelm_tokenizer::{StreamDecoder, Tokenizer, Encode};
use libfuzzer_sys::fuzz_target;

fn exercise(tok: &Tokenizer, text: &str) {
    for add_special in [false, true] {
        for parse_special in [false, true] {
            let Ok(ids) = tok.encode(text, Encode { add_special, parse_special }) else {
                continue;
            };
            for &id in &ids {
                assert!(
                    (id as usize) < tok.vocab_size(),
                    "encode produced id {id} outside the vocabulary of {}",
                    tok.vocab_size()
                );
            }
            let decoded = tok.decode(&ids).expect("ids from encode decode");
            let mut stream = StreamDecoder::new(tok);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&stream.push(id));
            }
            streamed.push_str(&stream.flush());
            let _ = (decoded, streamed);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let Ok(tok) = Tokenizer::from_gguf(&file) else {
        return;
    };
    let n = tok.vocab_size() as u32;
    let _ = format!("{tok:?}");
    let _ = (tok.vocab_type(), tok.pre_tokenizer(), tok.chat_template());
    let _ = (
        tok.bos(),
        tok.eos(),
        tok.adds_bos(),
        tok.adds_eos(),
        tok.eog_ids(),
    );
    for id in 0..n.min(4096) {
        let _ = (tok.is_eog(id), tok.is_control(id));
        let text = tok.token_text(id).expect("in-range id has text");
        assert_eq!(tok.token_id(text).map(|i| i <= id), Some(true));
        tok.token_piece_bytes(id).expect("in-range id has a piece");
        tok.token_piece_bytes_special(id)
            .expect("in-range id has a piece");
    }
    for id in [n, n.saturating_add(1), u32::MAX] {
        assert!(tok.token_piece_bytes(id).is_none());
        assert!(tok.decode(&[id]).is_err());
    }
    for text in edgelm_fuzz::FIXED_TEXTS {
        exercise(&tok, text);
    }
    // Text made of the vocabulary's own entries hits its special tokens and merges.
    let mut text = String::new();
    for id in 0..n.min(64) {
        text.push_str(tok.token_text(id).unwrap());
        if id % 3 == 0 {
            text.push(' ');
        }
    }
    exercise(&tok, &text);
    if let Some(t) = tok.chat_template() {
        exercise(&tok, &t.chars().take(512).collect::<String>());
    }
});
