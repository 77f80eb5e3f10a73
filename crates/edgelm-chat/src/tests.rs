use super::*;
use serde_json::json;

fn render(
    source: Option<&str>,
    messages: &[serde_json::Value],
    gen: bool,
) -> Result<String, ChatError> {
    ChatTemplate::new(source, "<s>", "</s>")?.render(messages, None, gen)
}

fn render_str(source: &str) -> String {
    render(Some(source), &[], false).unwrap()
}

#[test]
fn fallback_is_chatml() {
    let t = ChatTemplate::new(None, "", "").unwrap();
    assert!(t.is_fallback());
    let msgs = [
        Message::system("Be brief."),
        Message::user("hi\nthere"),
        Message::assistant("hello"),
        json!({"role": "assistant", "content": null}),
    ];
    assert_eq!(
        t.render(&msgs, None, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi\nthere<|im_end|>\n\
         <|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&[Message::user("x")], None, false).unwrap(),
        "<|im_start|>user\nx<|im_end|>\n"
    );
    assert!(!ChatTemplate::new(Some("x"), "", "").unwrap().is_fallback());
}

#[test]
fn raise_exception_gives_the_templates_message() {
    let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}ok";
    let err = render(Some(src), &[Message::assistant("a")], true).unwrap_err();
    assert!(
        matches!(&err, ChatError::Raised { message } if message == "Conversations must start with a user message")
    );
    assert_eq!(
        err.to_string(),
        "Conversations must start with a user message"
    );
    assert_eq!(
        render(Some(src), &[Message::user("a")], true).unwrap(),
        "ok"
    );
}

#[test]
fn syntax_error_names_reason_and_line() {
    let err = ChatTemplate::new(
        Some("line one\n{% for m in messages %}\n{{ m.content }"),
        "",
        "",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ChatError::Compile { .. }), "{text}");
    assert!(text.contains("syntax error"), "{text}");
    assert!(text.contains("line 3") || text.contains(":3"), "{text}");
}

#[test]
fn render_error_names_reason() {
    // jinja2 raises TypeError for str + None too.
    let err = render(
        Some("{{ 'a' + messages[0].content }}"),
        &[json!({"role": "user", "content": null})],
        false,
    )
    .unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("rendering the chat template failed"),
        "{err}"
    );
}

#[test]
fn content_parts_are_joined() {
    let msgs = [json!({"role": "user", "content": [
        {"type": "text", "text": "Hello, "},
        {"type": "text", "text": "world"}
    ]})];
    assert_eq!(
        render(None, &msgs, false).unwrap(),
        "<|im_start|>user\nHello, world<|im_end|>\n"
    );
    let image = [json!({"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "x"}}
    ]})];
    let err = render(None, &image, false).unwrap_err();
    assert!(matches!(err, ChatError::InvalidMessage { index: 0, .. }));
    assert!(err.to_string().contains("\"image_url\""), "{err}");
    assert!(matches!(
        render(None, &[json!("hi")], false),
        Err(ChatError::InvalidMessage { .. })
    ));
}

#[test]
fn tojson_spaces_like_python() {
    assert_eq!(
        render_str("{{ {'a': [1, 2]} | tojson }}"),
        r#"{"a": [1, 2]}"#
    );
    assert_eq!(
        render_str("{{ {'a': [1, 2]} | tojson(separators=(',', ':')) }}"),
        r#"{"a":[1,2]}"#
    );
    assert_eq!(
        render_str(
            "{{ {'b': {'c': none}, 'a': [true, 1.5, 'x']} | tojson(indent=2, sort_keys=true) }}"
        ),
        "{\n  \"a\": [\n    true,\n    1.5,\n    \"x\"\n  ],\n  \"b\": {\n    \"c\": null\n  }\n}"
    );
    assert_eq!(
        render_str("{{ [[], {}] | tojson(indent=2) }}"),
        "[\n  [],\n  {}\n]"
    );
    // No HTML escaping, unlike Jinja's own tojson.
    assert_eq!(
        render_str(r#"{{ "<a href='x'>&\"\n" | tojson }}"#),
        r#""<a href='x'>&\"\n""#
    );
}

#[test]
fn non_ascii_is_kept() {
    assert_eq!(
        render_str("{{ 'héllo 世界 😀' | tojson }}"),
        "\"héllo 世界 😀\""
    );
    assert_eq!(
        render_str("{{ 'é😀' | tojson(ensure_ascii=true) }}"),
        r#""\u00e9\ud83d\ude00""#
    );
    let msgs = [Message::user("naïve — 日本語 <b>&amp;</b>")];
    assert_eq!(
        render(None, &msgs, false).unwrap(),
        "<|im_start|>user\nnaïve — 日本語 <b>&amp;</b><|im_end|>\n"
    );
}

#[test]
fn tools_and_key_order_reach_the_template() {
    let tools =
        [json!({"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}})];
    let t = ChatTemplate::new(Some("{% if tools is none %}none{% endif %}{% for t in tools or [] %}{{ t | tojson }}{% endfor %}"), "", "").unwrap();
    assert_eq!(t.render(&[], None, false).unwrap(), "none");
    assert_eq!(
        t.render(&[], Some(&tools), false).unwrap(),
        r#"{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}}"#
    );
}

#[test]
fn prompts_describe_tools_only_to_templates_that_do_not_show_them() {
    let tools = [json!({"type": "function", "function": {"name": "get_weather"}})];
    let user = [Message::user("hi")];
    let plain = ChatTemplate::new(
        Some("{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}"),
        "",
        "",
    )
    .unwrap();
    let described = plain.render_prompt(&user, Some(&tools)).unwrap();
    assert!(
        described.starts_with("system:You can call these tools"),
        "{described}"
    );
    assert!(
        described.contains("get_weather") && described.ends_with("user:hi|"),
        "{described}"
    );
    assert_eq!(plain.render_prompt(&user, None).unwrap(), "user:hi|");
    // A template that reads `tools` gets them as they are.
    let aware = ChatTemplate::new(
        Some(
            "{% for t in tools or [] %}{{ t.function.name }};{% endfor %}{{ messages[0].content }}",
        ),
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        aware.render_prompt(&user, Some(&tools)).unwrap(),
        "get_weather;hi"
    );
}

#[test]
fn python_style_values_and_methods() {
    assert_eq!(
        render_str("{{ '  x y  '.strip().split(' ') | tojson }}"),
        r#"["x", "y"]"#
    );
    assert_eq!(
        render_str("{{ 'abc'.startswith('ab') }} {{ none }} {{ 1e20 }} {{ 0.5 }} {{ 4 / 2 }}"),
        "True None 1e+20 0.5 2.0"
    );
    assert_eq!(
        render_str("{% for k, v in {'b': 1, 'a': 2}.items() %}{{ k }}{{ v }}{% endfor %}"),
        "b1a2"
    );
    assert_eq!(
        render_str(
            "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        ),
        "012"
    );
    assert_eq!(
        render_str("{% generation %}kept{% endgeneration %}"),
        "kept"
    );
}

#[test]
fn bos_eos_and_strftime() {
    let t = ChatTemplate::new(
        Some("{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}"),
        "<s>",
        "</s>",
    )
    .unwrap();
    assert_eq!(t.render(&[], None, false).unwrap(), "<s>|</s>|4");
}

#[test]
fn jinja2_whitespace_quirks_and_filters() {
    // jinja2 keeps the newline after `{% raw %}` despite trim_blocks; raw bodies stay verbatim.
    assert_eq!(
        render_str("  {% raw %}\n  {{ x }} {% generation %}\n  {% endraw %}\nA"),
        "\n  {{ x }} {% generation %}\nA"
    );
    assert_eq!(render_str("{% raw -%}\n  y{% endraw %}"), "y");
    assert_eq!(
        render_str("{%- generation -%}\n  kept\n{%- endgeneration %}\n{{ '{% raw %}' }}"),
        "kept{% raw %}"
    );
    assert_eq!(
        render_str(r#"{{ "<'\"&>" | e }}|{{ 1e20 | string }}"#),
        "&lt;&#39;&#34;&amp;&gt;|1e+20"
    );
    assert_eq!(
        render_str("{{ 'ab' is sequence }}{{ {} is sequence }}{{ 1 is sequence }}"),
        "TrueTrueFalse"
    );
}

#[test]
fn map_passes_keyword_arguments_to_the_filter() {
    assert_eq!(
        render_str("{{ [{'a': 1}] | map('tojson', indent=1) | join(';') }}|{{ [{'a': 2}] | map(attribute='a') | list }}|{{ ['x'] | map('upper') | list }}"),
        "{\n \"a\": 1\n}|[2]|['X']"
    );
}

#[test]
fn runaway_templates_fail_instead_of_hanging() {
    // 10^10 iterations: stopped by the fuel limit, quickly.
    let start = std::time::Instant::now();
    let err = render(
        Some("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"),
        &[],
        false,
    )
    .unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
    assert!(err.to_string().contains("fuel"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    // Output that doubles each round.
    let err = render(
        Some("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"),
        &[],
        false,
    )
    .unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
}

#[test]
fn tojson_output_is_bounded() {
    // A huge indent used to allocate `indent` spaces up front (capacity overflow / OOM).
    for src in [
        "{{ [1] | tojson(indent=1000000000000000000) }}",
        "{{ [1] | tojson(indent=9223372036854775807) }}",
    ] {
        let err = render(Some(src), &[], false).unwrap_err();
        assert!(err.to_string().contains("indent"), "{src}: {err}");
    }
    // Indentation grows with the depth on every line: stopped at the output limit.
    let err = render(
        Some("{% set ns = namespace(x=[1,2,3,4,5,6,7,8]) %}{% for i in range(40) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x | tojson(indent=1000) }}"),
        &[],
        false,
    )
    .unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
    // Nesting deeper than the limit is an error, not a stack overflow.
    let err = render(
        Some("{% set ns = namespace(x=1) %}{% for i in range(5000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x | tojson }}"),
        &[],
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("nested"), "{err}");
    // Ordinary indentation still works.
    assert_eq!(
        render_str("{{ {'a': [1]} | tojson(indent=2) }}"),
        "{\n  \"a\": [\n    1\n  ]\n}"
    );
}
