//! A model's chat template (`tokenizer.chat_template`, untrusted: it comes from a downloaded
//! GGUF file) rendered over a conversation: compiling and rendering must return Ok or Err, never
//! panic, hang or exhaust memory (the render fuel and `tojson`'s limits bound the work).
//!
//! Input: the template source, then optionally a NUL byte and a JSON array of message objects
//! (without one, or with an empty rest, a fixed conversation is used). Inputs whose rest is not
//! a JSON array of objects are skipped.
#![no_main]

use edgelm_chat::ChatTemplate;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn default_messages() -> Vec<Value> {
    vec![
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "What is 2+2?"}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]}),
        json!({"role": "tool", "tool_call_id": "c1", "content": "4"}),
        json!({"role": "assistant", "content": [{"type": "text", "text": "4"}]}),
        json!({"role": "user", "content": "Thanks\n"}),
    ]
}

fuzz_target!(|data: &[u8]| {
    let (src, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let messages = if rest.is_empty() {
        default_messages()
    } else {
        match serde_json::from_slice::<Value>(rest) {
            Ok(Value::Array(list)) if list.iter().all(Value::is_object) => list,
            _ => return,
        }
    };
    let src = String::from_utf8_lossy(src);
    let tools = [json!({"type": "function", "function": {"name": "add",
        "description": "Adds two numbers.", "parameters": {"type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}})];
    if let Ok(template) = ChatTemplate::new(Some(&src), "<s>", "</s>") {
        assert!(!template.is_fallback());
        let _ = template.render(&messages, None, true);
        let _ = template.render(&messages, Some(&tools), false);
    }
    // The built-in ChatML template takes any list of message objects.
    let chatml = ChatTemplate::new(None, "<s>", "</s>").expect("ChatML compiles");
    let _ = chatml.render(&messages, None, true);
});
