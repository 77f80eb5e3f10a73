//! Model output through the tool-call parsers: any text, in every syntax, must parse without
//! panicking, lose no text when it holds no call, and stream to exactly the batch result
//! whatever the chunking.
//!
//! Input: one byte choosing the chunk length (1..=16 characters), then the text (lossy UTF-8).
#![no_main]

use edgelm_chat::tools::{parse_tool_calls, ParsedOutput, ToolCallFormat, ToolCallParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 16) + 1;
    let text = String::from_utf8_lossy(rest);
    let chars: Vec<char> = text.chars().collect();
    for format in [
        ToolCallFormat::Hermes,
        ToolCallFormat::Llama3,
        ToolCallFormat::Mistral,
        ToolCallFormat::Generic,
    ] {
        let batch = parse_tool_calls(format, &text);
        if batch.calls.is_empty() {
            assert_eq!(batch.content.as_deref().unwrap_or(""), text, "{format:?}");
        }
        for call in &batch.calls {
            let args: serde_json::Value =
                serde_json::from_str(&call.arguments).expect("arguments are JSON");
            assert!(args.is_object(), "{format:?}: {}", call.arguments);
        }
        let mut parser = ToolCallParser::new(format);
        let mut events = Vec::new();
        for piece in chars.chunks(chunk) {
            events.extend(parser.push(&piece.iter().collect::<String>()));
        }
        events.extend(parser.finish());
        assert_eq!(ParsedOutput::from_events(events), batch, "{format:?}");
    }
});
