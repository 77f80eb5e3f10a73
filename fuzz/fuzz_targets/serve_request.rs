//! Request bodies of `edgelm serve` (untrusted: any HTTP client's bytes) through the server's
//! parsing and validation, `edgelm_server::api::parse_body`: it must return Ok or Err, never
//! panic. On Ok the request holds only values the engine accepts (the ranges `api.rs`
//! documents); on Err it is a 400 whose OpenAI-shaped error body serializes.
//!
//! Input: one byte whose low bit picks the endpoint (0: `/v1/chat/completions`, 1:
//! `/v1/completions`), then the body.
#![no_main]

use edgelm_chat::ChatTemplate;
use edgelm_server::api::{parse_body, Kind, Prompt, MAX_TOP_LOGPROBS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = if selector & 1 == 0 {
        Kind::Chat
    } else {
        Kind::Completion
    };
    let p = match parse_body(kind, body) {
        Ok(p) => p,
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400, "{e}");
            assert!(!e.message.is_empty());
            let text = e.body().to_string();
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
            return;
        }
    };
    assert_eq!(p.kind, kind);
    assert!(p.n >= 1);
    assert!(p.max_tokens.map_or(true, |m| m >= 1));
    assert!(p.logprobs.map_or(true, |k| k <= MAX_TOP_LOGPROBS));
    assert!(p.stop.len() <= 16 && p.stop.iter().all(|s| !s.is_empty()));
    assert!(p
        .logit_bias
        .iter()
        .all(|&(_, b)| b.is_finite() && (-100.0..=100.0).contains(&b)));
    let s = &p.sampling;
    assert!((0.0..=2.0).contains(&s.temperature), "{s:?}");
    assert!((0.0..=1.0).contains(&s.top_p), "{s:?}");
    assert!((0.0..=1.0).contains(&s.min_p), "{s:?}");
    assert!((0.0..=10.0).contains(&s.repeat_penalty), "{s:?}");
    assert!((-2.0..=2.0).contains(&s.frequency_penalty), "{s:?}");
    assert!((-2.0..=2.0).contains(&s.presence_penalty), "{s:?}");
    match (&p.prompt, kind) {
        (Prompt::Chat { messages, tools }, Kind::Chat) => {
            assert!(!messages.is_empty() && messages.iter().all(|m| m.is_object()));
            assert!(!p.echo);
            // What the server does next for a model without a template.
            let chatml = ChatTemplate::new(None, "", "").expect("ChatML compiles");
            let _ = chatml.render(messages, tools.as_deref(), true);
        }
        (Prompt::Text(_) | Prompt::Tokens(_), Kind::Completion) => {}
        (prompt, kind) => panic!("{kind:?} request with prompt {prompt:?}"),
    }
});
