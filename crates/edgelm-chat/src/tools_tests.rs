use super::*;
use ToolCallFormat::{Generic, Hermes, Llama3, Mistral};

fn call(name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: None,
        name: name.to_owned(),
        arguments: arguments.to_owned(),
    }
}

fn call_id(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: Some(id.to_owned()),
        ..call(name, arguments)
    }
}

/// Adjacent contents merged, so event lists from different chunkings compare equal.
fn normalize(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::new();
    for event in events {
        match (out.last_mut(), event) {
            (_, ToolEvent::Content(text)) if text.is_empty() => {}
            (Some(ToolEvent::Content(last)), ToolEvent::Content(text)) => last.push_str(&text),
            (_, event) => out.push(event),
        }
    }
    out
}

fn stream<'a>(format: ToolCallFormat, chunks: impl IntoIterator<Item = &'a str>) -> Vec<ToolEvent> {
    let mut parser = ToolCallParser::new(format);
    let mut events = Vec::new();
    for chunk in chunks {
        events.extend(parser.push(chunk));
    }
    events.extend(parser.finish());
    normalize(events)
}

/// Deterministic xorshift, for reproducible random splits.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn boundaries(text: &str) -> Vec<usize> {
    (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect()
}

/// Streaming gives the batch result for: every split in two, every split in three (short
/// texts), one char at a time, and random chunkings.
fn check_streaming(format: ToolCallFormat, text: &str) {
    let want = stream(format, [text]);
    let cuts = boundaries(text);
    let same = |chunks: Vec<&str>| {
        let got = stream(format, chunks.iter().copied());
        assert_eq!(
            got,
            want,
            "{} text {text:?} split as {chunks:?}",
            format.name()
        );
    };
    for &i in &cuts {
        same(vec![&text[..i], &text[i..]]);
    }
    if cuts.len() <= 90 {
        for (a, &i) in cuts.iter().enumerate() {
            for &j in &cuts[a..] {
                same(vec![&text[..i], &text[i..j], &text[j..]]);
            }
        }
    }
    same(
        text.char_indices()
            .map(|(i, c)| &text[i..i + c.len_utf8()])
            .collect(),
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ text.len() as u64);
    for _ in 0..64 {
        let mut chunks = vec![""];
        let mut at = 0;
        while at < text.len() {
            let mut end = (at + 1 + rng.below(12)).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            chunks.push(&text[at..end]);
            at = end;
        }
        same(chunks);
    }
    // Call indices count from 0.
    let indices: Vec<usize> = want
        .iter()
        .filter_map(|e| match e {
            ToolEvent::Call { index, .. } => Some(*index),
            ToolEvent::Content(_) => None,
        })
        .collect();
    assert_eq!(indices, (0..indices.len()).collect::<Vec<_>>());
}

/// Batch result as expected, streaming identical under many splits.
fn expect(format: ToolCallFormat, text: &str, content: Option<&str>, calls: &[ToolCall]) {
    let got = parse_tool_calls(format, text);
    assert_eq!(
        got,
        ParsedOutput {
            content: content.map(str::to_owned),
            calls: calls.to_vec(),
        },
        "{} text {text:?}",
        format.name()
    );
    check_streaming(format, text);
}

/// Not a call: the whole text comes back as content.
fn expect_content(format: ToolCallFormat, text: &str) {
    expect(format, text, Some(text), &[]);
}

const WEATHER: &str =
    r#"{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}"#;
const WEATHER_ARGS: &str = r#"{"city":"Paris","unit":"celsius"}"#;
const TIME: &str = r#"{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}"#;
const TIME_ARGS: &str = r#"{"tz":"Europe/Paris"}"#;
/// Braces, brackets, escaped quotes and backslashes inside strings, deep nesting.
const NESTED: &str = r#"{"name": "run", "arguments": {"code": "fn main() { println!(\"}{][\"); }", "deep": {"a": [1, {"b": "\\\"}"}, -2.5e3, true, null]}}}"#;
const NESTED_ARGS: &str = r#"{"code":"fn main() { println!(\"}{][\"); }","deep":{"a":[1,{"b":"\\\"}"},-2500.0,true,null]}}"#;
const UNICODE: &str =
    r#"{"name": "translate", "arguments": {"text": "Zürich 🌍 日本語", "to": "\u00e9t\u00e9"}}"#;
const UNICODE_ARGS: &str = r#"{"text":"Zürich 🌍 日本語","to":"été"}"#;

fn hermes(json: &str) -> String {
    format!("<tool_call>\n{json}\n</tool_call>")
}

// ---------------------------------------------------------------- Hermes

#[test]
fn hermes_single_call() {
    let text = hermes(WEATHER);
    expect(Hermes, &text, None, &[call("get_weather", WEATHER_ARGS)]);
    // Qwen ends its turn right after the call; a trailing newline is layout.
    expect(
        Hermes,
        &format!("{text}\n"),
        None,
        &[call("get_weather", WEATHER_ARGS)],
    );
}

#[test]
fn hermes_bare_or_fenced_json_call() {
    // Qwen2.5-Coder answers a tool request this way rather than with `<tool_call>`.
    let fenced = format!("```json\n{WEATHER}\n```");
    expect(Hermes, &fenced, None, &[call("get_weather", WEATHER_ARGS)]);
    expect(Hermes, WEATHER, None, &[call("get_weather", WEATHER_ARGS)]);
    // A JSON answer that is not a call stays the answer.
    expect_content(Hermes, "```json\n{\"city\": \"Paris\"}\n```");
    expect_content(Hermes, "{\"name\": \"Bob\"}");
}

#[test]
fn hermes_two_calls() {
    let text = format!("{}\n{}", hermes(WEATHER), hermes(TIME));
    expect(
        Hermes,
        &text,
        None,
        &[
            call("get_weather", WEATHER_ARGS),
            call("get_time", TIME_ARGS),
        ],
    );
}

#[test]
fn hermes_text_before_between_and_after() {
    let text = format!("Let me check.\n{}\n", hermes(WEATHER));
    expect(
        Hermes,
        &text,
        Some("Let me check.\n"),
        &[call("get_weather", WEATHER_ARGS)],
    );
    let text = format!("A\n{}\nB\n{}\nDone.", hermes(WEATHER), hermes(TIME));
    expect(
        Hermes,
        &text,
        Some("A\n\nB\n\nDone."),
        &[
            call("get_weather", WEATHER_ARGS),
            call("get_time", TIME_ARGS),
        ],
    );
}

#[test]
fn hermes_missing_closing_tag() {
    let weather = [call("get_weather", WEATHER_ARGS)];
    expect(Hermes, &format!("<tool_call>\n{WEATHER}\n"), None, &weather);
    expect(Hermes, &format!("<tool_call>{WEATHER}"), None, &weather);
    // Cut off inside the closing tag: the call stands, the fragment is text.
    expect(
        Hermes,
        &format!("<tool_call>\n{WEATHER}\n</tool_"),
        Some("\n</tool_"),
        &weather,
    );
    // Missing before the next call.
    expect(
        Hermes,
        &format!("<tool_call>\n{WEATHER}\n<tool_call>\n{TIME}\n</tool_call>"),
        None,
        &[
            call("get_weather", WEATHER_ARGS),
            call("get_time", TIME_ARGS),
        ],
    );
    // Followed by other text instead: not a call.
    expect_content(Hermes, &format!("<tool_call>\n{WEATHER}\nand more"));
}

#[test]
fn hermes_malformed_json() {
    expect_content(
        Hermes,
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1,}}\n</tool_call>",
    );
    expect_content(
        Hermes,
        "<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>",
    );
    expect_content(Hermes, "<tool_call>\n{\"name\": \"f\"} x\n</tool_call>");
    expect_content(Hermes, "Use the <tool_call> tag to call a function.");
    // A bad call does not hide the next one.
    let bad = "<tool_call>\n{\"name\": \"f\", \"arguments\": {]}\n</tool_call>";
    expect(
        Hermes,
        &format!("{bad}\n{}", hermes(TIME)),
        Some(&format!("{bad}\n")),
        &[call("get_time", TIME_ARGS)],
    );
    // Unbalanced: the scan rejects at `<`, the next call is still found.
    let bad = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call>";
    expect(
        Hermes,
        &format!("{bad}\n{}", hermes(TIME)),
        Some(&format!("{bad}\n")),
        &[call("get_time", TIME_ARGS)],
    );
}

#[test]
fn hermes_truncated() {
    expect_content(
        Hermes,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
    );
    expect_content(Hermes, "Sure. <tool_call>\n{\"name\": \"get_weather\"");
    expect_content(Hermes, "Sure. <tool_c");
    expect_content(Hermes, "<tool_call>\n");
    expect_content(Hermes, "<tool_call>");
    expect(
        Hermes,
        &format!("{}\n<tool_call>\n{{\"name\": \"get_ti", hermes(WEATHER)),
        Some("\n<tool_call>\n{\"name\": \"get_ti"),
        &[call("get_weather", WEATHER_ARGS)],
    );
}

#[test]
fn hermes_missing_name_or_bad_arguments() {
    expect_content(Hermes, &hermes(r#"{"arguments": {"a": 1}}"#));
    expect_content(Hermes, &hermes(r#"{"name": "", "arguments": {}}"#));
    expect_content(Hermes, &hermes(r#"{"name": 3, "arguments": {}}"#));
    expect_content(Hermes, &hermes(r#"{"name": "f", "arguments": [1, 2]}"#));
    expect_content(Hermes, &hermes(r#"{"name": "f", "arguments": "not json"}"#));
    expect_content(Hermes, &hermes(r#"{"name": "f", "arguments": "[1]"}"#));
    expect_content(Hermes, &hermes(r#"{"name": "f", "arguments": null}"#));
    // A string holding an object is decoded; no arguments at all is a call without any.
    expect(
        Hermes,
        &hermes(r#"{"name": "f", "arguments": "{\"a\": [1, \"}\"]}"}"#),
        None,
        &[call("f", r#"{"a":[1,"}"]}"#)],
    );
    expect(
        Hermes,
        &hermes(r#"{"name": "now"}"#),
        None,
        &[call("now", "{}")],
    );
}

#[test]
fn hermes_nested_and_unicode() {
    expect(Hermes, &hermes(NESTED), None, &[call("run", NESTED_ARGS)]);
    // Deeper than serde_json's limit: text, without recursion in the scan.
    let deep = hermes(&format!(
        r#"{{"name": "f", "arguments": {{"a": {}{}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    ));
    assert_eq!(
        parse_tool_calls(Hermes, &deep).content.as_deref(),
        Some(deep.as_str())
    );
    expect(
        Hermes,
        &format!("Voilà — 🌍\n{}", hermes(UNICODE)),
        Some("Voilà — 🌍\n"),
        &[call("translate", UNICODE_ARGS)],
    );
    expect(
        Hermes,
        &hermes(r#"{"name": "f", "arguments": {"a": 1}, "id": "call_7"}"#),
        None,
        &[call_id("call_7", "f", r#"{"a":1}"#)],
    );
}

#[test]
fn plain_text_is_unchanged() {
    for format in [Hermes, Llama3, Mistral, Generic] {
        for text in [
            "Hello! How can I help?",
            "  indented\n\n",
            "\n",
            "a < b and [c] {d}",
            "Zürich 🌍 日本語 <tool [TOOL <|python",
        ] {
            expect_content(format, text);
        }
        expect(format, "", None, &[]);
    }
}

// ---------------------------------------------------------------- Llama 3

const L_WEATHER: &str =
    r#"{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}"#;
const L_TIME: &str = r#"{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}"#;

#[test]
fn llama3_single_call() {
    let weather = [call("get_weather", WEATHER_ARGS)];
    expect(Llama3, L_WEATHER, None, &weather);
    expect(Llama3, WEATHER, None, &weather);
    expect(Llama3, &format!("\n  {L_WEATHER}\n"), None, &weather);
    // Llama 3.2 adds a type.
    expect(
        Llama3,
        r#"{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}"#,
        None,
        &weather,
    );
    expect(
        Llama3,
        &format!("<|python_tag|>{L_WEATHER}"),
        None,
        &weather,
    );
}

#[test]
fn llama3_two_calls() {
    let both = [
        call("get_weather", WEATHER_ARGS),
        call("get_time", TIME_ARGS),
    ];
    expect(Llama3, &format!("{L_WEATHER}; {L_TIME}"), None, &both);
    expect(Llama3, &format!("{L_WEATHER};{L_TIME}"), None, &both);
    expect(Llama3, &format!("{L_WEATHER}\n{L_TIME}\n"), None, &both);
    expect(
        Llama3,
        &format!("<|python_tag|>{L_WEATHER}; {L_TIME}"),
        None,
        &both,
    );
}

#[test]
fn llama3_text_before_and_after() {
    let weather = [call("get_weather", WEATHER_ARGS)];
    // A bare JSON call must be the answer itself.
    expect_content(Llama3, &format!("Sure! {L_WEATHER}"));
    // After `<|python_tag|>` anywhere it is a call.
    expect(
        Llama3,
        &format!("Let me look.<|python_tag|>{L_WEATHER}"),
        Some("Let me look."),
        &weather,
    );
    expect(
        Llama3,
        &format!("{L_WEATHER}\nThat is all."),
        Some("\nThat is all."),
        &weather,
    );
    expect(
        Llama3,
        &format!("{L_WEATHER}; bye"),
        Some("; bye"),
        &weather,
    );
    // A second object that is no call is content.
    expect(
        Llama3,
        &format!("{L_WEATHER}; {{\"x\": 1}}"),
        Some("; {\"x\": 1}"),
        &weather,
    );
}

#[test]
fn llama3_builtin_call() {
    expect(
        Llama3,
        r#"<|python_tag|>brave_search.call(query="weather in \"Paris\" {today}")"#,
        None,
        &[call(
            "brave_search",
            r#"{"query":"weather in \"Paris\" {today}"}"#,
        )],
    );
    expect(
        Llama3,
        "<|python_tag|>wolfram_alpha.call(query='2+2 (x)', n=3, r=-1.5, exact=True, x=None, l=[1, 'a'], d={'k': False},)",
        None,
        &[call(
            "wolfram_alpha",
            r#"{"query":"2+2 (x)","n":3,"r":-1.5,"exact":true,"x":null,"l":[1,"a"],"d":{"k":false}}"#,
        )],
    );
    expect(
        Llama3,
        r#"<|python_tag|>brave_search.call(query="caf\u00e9 \xe9 🌍")"#,
        None,
        &[call("brave_search", r#"{"query":"café é 🌍"}"#)],
    );
    // Code for the interpreter, positional arguments, expressions: not calls.
    expect_content(Llama3, "<|python_tag|>import math\nprint(math.pi)");
    expect_content(Llama3, "<|python_tag|>brave_search.call(\"x\")");
    expect_content(Llama3, "<|python_tag|>brave_search.call(query=x + 1)");
    expect_content(
        Llama3,
        "<|python_tag|>brave_search.call(query=\"unterminated)",
    );
    expect_content(Llama3, "<|python_tag|>brave_search.call(query=\"a\"");
    // Deep nesting is refused, not recursed into.
    let deep = format!(
        "<|python_tag|>f.call(x={}{})",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    assert_eq!(
        parse_tool_calls(Llama3, &deep).content.as_deref(),
        Some(deep.as_str())
    );
    let ok = format!(
        "<|python_tag|>f.call(x={}{})",
        "[".repeat(64),
        "]".repeat(64)
    );
    assert_eq!(parse_tool_calls(Llama3, &ok).calls.len(), 1);
}

#[test]
fn llama3_malformed_and_not_calls() {
    expect_content(Llama3, r#"{"name": "f", "parameters": {"a": 1,}}"#);
    expect_content(Llama3, r#"{"name": "f", "parameters": {"a": 1}]"#);
    expect_content(Llama3, "{name: f}");
    expect_content(Llama3, "{Hello} there");
    expect_content(Llama3, r#"{"answer": 42}"#);
    // Without a marker a call needs its arguments.
    expect_content(Llama3, r#"{"name": "Bob"}"#);
    expect_content(Llama3, r#"{"parameters": {"a": 1}}"#);
    expect_content(Llama3, r#"{"name": "f", "parameters": 5}"#);
    expect_content(Llama3, r#"{"name": "f", "parameters": [1]}"#);
    expect_content(
        Llama3,
        "<|python_tag|>{\"name\": \"f\", \"parameters\": {]}",
    );
}

#[test]
fn llama3_truncated() {
    expect_content(
        Llama3,
        r#"{"name": "get_weather", "parameters": {"city": "Par"#,
    );
    expect_content(Llama3, "{");
    expect_content(Llama3, "  {\"na");
    expect_content(Llama3, "<|python_tag|>{\"name\": \"f\"");
    expect_content(Llama3, "<|python_t");
    expect(
        Llama3,
        &format!("{L_WEATHER}; {{\"name\": \"get_ti"),
        Some("; {\"name\": \"get_ti"),
        &[call("get_weather", WEATHER_ARGS)],
    );
}

#[test]
fn llama3_nested_and_unicode() {
    expect(Llama3, NESTED, None, &[call("run", NESTED_ARGS)]);
    expect(Llama3, UNICODE, None, &[call("translate", UNICODE_ARGS)]);
    expect(
        Llama3,
        r#"{"name": "f", "parameters": "{\"a\": \"}{\"}"}"#,
        None,
        &[call("f", r#"{"a":"}{"}"#)],
    );
}

// ---------------------------------------------------------------- Mistral

#[test]
fn mistral_v3_calls() {
    expect(
        Mistral,
        r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "abc123def"}]"#,
        None,
        &[call_id("abc123def", "get_weather", WEATHER_ARGS)],
    );
    expect(
        Mistral,
        &format!("[TOOL_CALLS] [{WEATHER}, {TIME}]"),
        None,
        &[
            call("get_weather", WEATHER_ARGS),
            call("get_time", TIME_ARGS),
        ],
    );
    expect(
        Mistral,
        &format!("[TOOL_CALLS]{WEATHER}"),
        None,
        &[call("get_weather", WEATHER_ARGS)],
    );
}

#[test]
fn mistral_v11_calls() {
    expect(
        Mistral,
        r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}"#,
        None,
        &[call("get_weather", WEATHER_ARGS)],
    );
    expect(
        Mistral,
        r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}"#,
        None,
        &[
            call("get_weather", WEATHER_ARGS),
            call("get_time", TIME_ARGS),
        ],
    );
    expect(
        Mistral,
        r#"[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"tz": "Europe/Paris"}"#,
        None,
        &[call_id("a1b2c3d4e", "get_time", TIME_ARGS)],
    );
}

#[test]
fn mistral_text_before() {
    expect(
        Mistral,
        &format!("Checking both.\n[TOOL_CALLS][{WEATHER}]"),
        Some("Checking both.\n"),
        &[call("get_weather", WEATHER_ARGS)],
    );
    expect(
        Mistral,
        r#"Sure[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"} done"#,
        Some("Sure done"),
        &[call("get_time", TIME_ARGS)],
    );
}

#[test]
fn mistral_malformed_truncated_and_invalid() {
    expect_content(Mistral, r#"[TOOL_CALLS][{"name": "f", "arguments": {]"#);
    expect_content(
        Mistral,
        r#"[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}"#,
    );
    expect_content(Mistral, r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Par"#);
    expect_content(Mistral, "[TOOL_CALLS]get_wea");
    expect_content(Mistral, "[TOOL_CALLS]get_weather[AR");
    expect_content(Mistral, "[TOOL_CALLS]get_weather[CALL_ID]ab");
    expect_content(Mistral, "[TOOL_CALLS]");
    expect_content(Mistral, "[TOOL_CA");
    expect_content(Mistral, "[TOOL_CALLS] get weather[ARGS]{}");
    expect_content(Mistral, "[TOOL_CALLS][]");
    expect_content(Mistral, r#"[TOOL_CALLS][{"arguments": {"a": 1}}]"#);
    expect_content(Mistral, r#"[TOOL_CALLS][{"name": "f", "arguments": 1}]"#);
    // One bad call makes the whole list text.
    expect_content(
        Mistral,
        &format!(r#"[TOOL_CALLS][{WEATHER}, {{"name": "g", "arguments": [1]}}]"#),
    );
    expect_content(Mistral, "[TOOL_CALLS]f[ARGS][1, 2]");
    expect_content(Mistral, "[TOOL_CALLS]f[ARGS]\"{}\"");
    // A bad marker does not hide a later call.
    expect(
        Mistral,
        "[TOOL_CALLS]oops [TOOL_CALLS]f[ARGS]{}",
        Some("[TOOL_CALLS]oops "),
        &[call("f", "{}")],
    );
}

#[test]
fn mistral_nested_and_unicode() {
    expect(
        Mistral,
        &format!("[TOOL_CALLS][{NESTED}, {UNICODE}]"),
        None,
        &[call("run", NESTED_ARGS), call("translate", UNICODE_ARGS)],
    );
    expect(
        Mistral,
        r#"[TOOL_CALLS]traduire_été[ARGS]{"text": "Zürich 🌍 日本語", "to": "\u00e9t\u00e9"}"#,
        None,
        &[call("traduire_été", UNICODE_ARGS)],
    );
}

// ---------------------------------------------------------------- Generic

#[test]
fn generic_forms() {
    let weather = [call("get_weather", WEATHER_ARGS)];
    expect(
        Generic,
        &format!(r#"{{"tool_call": {WEATHER}}}"#),
        None,
        &weather,
    );
    expect(Generic, WEATHER, None, &weather);
    expect(Generic, &format!("```json\n{WEATHER}\n```"), None, &weather);
    expect(
        Generic,
        &format!("```JSON\n{WEATHER}\n```\n"),
        None,
        &weather,
    );
    expect(Generic, &format!("```\n{WEATHER}\n```"), None, &weather);
    // Fence left open at the end.
    expect(Generic, &format!("```json\n{WEATHER}\n"), None, &weather);
    // A wrapper marks a call even without arguments.
    expect(
        Generic,
        r#"{"tool_call": {"name": "now"}}"#,
        None,
        &[call("now", "{}")],
    );
    // OpenAI-shaped items.
    expect(
        Generic,
        r#"{"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}"#,
        None,
        &[call_id("call_1", "f", r#"{"a":1}"#)],
    );
}

#[test]
fn generic_two_calls() {
    let both = [
        call("get_weather", WEATHER_ARGS),
        call("get_time", TIME_ARGS),
    ];
    expect(
        Generic,
        &format!(r#"{{"tool_calls": [{WEATHER}, {TIME}]}}"#),
        None,
        &both,
    );
    expect(
        Generic,
        &format!("```json\n{{\"tool_calls\": [{WEATHER},\n {TIME}]}}\n```"),
        None,
        &both,
    );
}

#[test]
fn generic_text_around() {
    // The answer must be the JSON itself.
    expect_content(Generic, &format!("Here you go: {WEATHER}"));
    expect(
        Generic,
        &format!("{WEATHER}\nDone."),
        Some("\nDone."),
        &[call("get_weather", WEATHER_ARGS)],
    );
    expect(
        Generic,
        &format!("```json\n{WEATHER}\n``` and then"),
        Some(" and then"),
        &[call("get_weather", WEATHER_ARGS)],
    );
    // Inside the fence only the call.
    expect_content(Generic, &format!("```json\n{WEATHER}\nand then\n```"));
    expect_content(Generic, "```python\nprint(1)\n```");
    expect_content(Generic, "```json\n{\"answer\": 42}\n```");
}

#[test]
fn generic_malformed_and_not_calls() {
    expect_content(
        Generic,
        r#"{"tool_call": {"name": "f", "arguments": {"a": 1,}}}"#,
    );
    expect_content(Generic, r#"{"tool_calls": []}"#);
    expect_content(Generic, r#"{"tool_calls": [{"arguments": {}}]}"#);
    expect_content(Generic, r#"{"tool_call": {"name": "f", "arguments": "x"}}"#);
    expect_content(
        Generic,
        r#"{"tool_calls": [{"name": "f", "arguments": {}}], "content": "hi"}"#,
    );
    expect_content(Generic, r#"{"name": "f", "arguments": 3}"#);
    expect_content(Generic, r#"{"name": "Bob", "age": 3}"#);
    expect_content(Generic, r#"{"response": "Hello"}"#);
    expect_content(
        Generic,
        r#"{"tool_call": {"name": "get_weather", "arguments": {"ci"#,
    );
    expect_content(Generic, "```json\n{\"tool_call\": {\"name\"");
    expect_content(Generic, "```js");
    expect_content(Generic, "``");
}

#[test]
fn generic_nested_and_unicode() {
    expect(
        Generic,
        &format!(r#"{{"tool_calls": [{NESTED}, {UNICODE}]}}"#),
        None,
        &[call("run", NESTED_ARGS), call("translate", UNICODE_ARGS)],
    );
}

// ---------------------------------------------------------------- streaming

fn pushes(format: ToolCallFormat, chunks: &[&str]) -> Vec<Vec<ToolEvent>> {
    let mut parser = ToolCallParser::new(format);
    let mut out: Vec<Vec<ToolEvent>> = chunks.iter().map(|c| parser.push(c)).collect();
    out.push(parser.finish());
    out
}

fn content(text: &str) -> ToolEvent {
    ToolEvent::Content(text.to_owned())
}

#[test]
fn streaming_releases_early() {
    let f = call("f", "{}");
    let got = pushes(
        Hermes,
        &[
            "Hello ",
            "<tool",
            "_call>\n{\"name\": \"f\", \"arguments\": {}}",
            "\n</tool_call>",
            "\n",
        ],
    );
    assert_eq!(
        got,
        vec![
            vec![content("Hello ")],
            vec![],
            vec![],
            vec![ToolEvent::Call {
                index: 0,
                call: f.clone()
            }],
            vec![],
            vec![],
        ]
    );
    // A bare JSON call is released at its closing brace; text at once; leading whitespace
    // with the text after it.
    let got = pushes(
        Llama3,
        &[
            "\n",
            "{\"name\": \"f\"",
            ", \"parameters\": {}}",
            "; ",
            "bye",
        ],
    );
    assert_eq!(
        got,
        vec![
            vec![],
            vec![],
            vec![ToolEvent::Call {
                index: 0,
                call: f.clone()
            }],
            vec![],
            vec![content("; bye")],
            vec![],
        ]
    );
    // Text after `{` that cannot be JSON is released as soon as that is clear.
    let got = pushes(Llama3, &["Hi", " {", "x"]);
    assert_eq!(
        got,
        vec![
            vec![content("Hi")],
            vec![content(" {")],
            vec![content("x")],
            vec![]
        ]
    );
    let got = pushes(Generic, &["{", "Hello"]);
    assert_eq!(got, vec![vec![], vec![content("{Hello")], vec![]]);
    let got = pushes(
        Mistral,
        &[
            "ok [TOOL_CALLS]",
            "f[ARGS]{}",
            "[TOOL_CALLS]g[ARGS]{\"a\":1}",
        ],
    );
    assert_eq!(
        got,
        vec![
            vec![content("ok ")],
            vec![ToolEvent::Call { index: 0, call: f }],
            vec![ToolEvent::Call {
                index: 1,
                call: call("g", r#"{"a":1}"#)
            }],
            vec![],
        ]
    );
    let mut parser = ToolCallParser::new(Mistral);
    parser.push("[TOOL_CALLS]f[ARGS]{}");
    assert_eq!(parser.call_count(), 1);
}

/// Random outputs assembled from call syntax fragments, valid and broken: streaming always
/// equals batch, and an output without calls comes back unchanged.
#[test]
fn streaming_equals_batch_on_random_outputs() {
    const PIECES: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>",
        "[TOOL_CALLS]",
        "[TOOL_CALLS]f[ARGS]{\"a\": \"}\"}",
        "[TOOL_CALLS][{\"name\": \"g\", \"arguments\": {}}]",
        "[ARGS]",
        "[CALL_ID]x1",
        "<|python_tag|>",
        "<|python_tag|>s.call(q=\"a)\")",
        "{\"name\": \"f\", \"parameters\": {\"b\": [1, {}]}}",
        "{\"tool_calls\": [{\"name\": \"h\", \"arguments\": {}}]}",
        "```json\n",
        "```",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        ";",
        ":",
        ",",
        "\"name\"",
        "\"arguments\": ",
        " ",
        "\n",
        "text",
        "é🌍",
        "<",
        "`",
    ];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for case in 0..400 {
        let n = 1 + rng.below(8);
        let text: String = (0..n).map(|_| PIECES[rng.below(PIECES.len())]).collect();
        let format = [Hermes, Llama3, Mistral, Generic][case % 4];
        let batch = parse_tool_calls(format, &text);
        if batch.calls.is_empty() {
            assert_eq!(
                batch.content.as_deref(),
                (!text.is_empty()).then_some(text.as_str()),
                "{} lost text",
                format.name()
            );
        }
        check_streaming(format, &text);
    }
}

// ---------------------------------------------------------------- detection

#[test]
fn detect_from_templates() {
    let qwen = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- endif %}"#;
    let llama31 = r#"{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
        {%- endif %}
    {%- endif %}
{%- endfor %}"#;
    let llama32_no_tag = r#"{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
{%- endif %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"#;
    let mistral = r#"{%- if message["role"] == "assistant" and message.tool_calls is defined %}
    {{- "[TOOL_CALLS] [" }}
    {%- for tool_call in message.tool_calls %}
        {{- '{"name": "' + tool_call.function.name + '", "arguments": ' + tool_call.function.arguments|tojson + ', "id": "' + tool_call.id + '"}' }}
    {%- endfor %}
    {{- "]" + eos_token }}
{%- endif %}"#;
    let llama30 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}";
    assert_eq!(ToolCallFormat::detect(qwen), Hermes);
    assert_eq!(ToolCallFormat::detect(llama31), Llama3);
    assert_eq!(ToolCallFormat::detect(llama32_no_tag), Llama3);
    assert_eq!(ToolCallFormat::detect(mistral), Mistral);
    assert_eq!(ToolCallFormat::detect(llama30), Generic);
    assert_eq!(ToolCallFormat::detect(crate::CHATML_TEMPLATE), Generic);
}

#[test]
fn format_names_and_markers() {
    for format in [Hermes, Llama3, Mistral, Generic] {
        assert_eq!(ToolCallFormat::from_name(format.name()), Some(format));
        if let Some(marker) = format.call_marker() {
            assert_eq!(format.markers(), [marker]);
        }
    }
    assert_eq!(ToolCallFormat::from_name("chatml"), None);
    assert_eq!(Hermes.call_marker(), Some("<tool_call>"));
    assert_eq!(Mistral.call_marker(), Some("[TOOL_CALLS]"));
    assert_eq!(Llama3.call_marker(), None);
    assert_eq!(Llama3.markers(), ["<|python_tag|>"]);
    assert_eq!(Generic.call_marker(), None);
}
