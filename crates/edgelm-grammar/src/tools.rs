//! Grammars for tool calls in each syntax `edgelm_chat::tools` parses, so a forced call
//! (`tool_choice` required or named) is always well-formed and its arguments valid for the
//! function's parameter schema, and an optional one (`auto`) is held to that once the model
//! opens it.

use crate::{with_layout, GrammarError, GrammarSpec};
use edgelm_chat::tools::ToolCallFormat;
use edgelm_tokenizer::Tokenizer;
use serde_json::{json, Value};

/// OpenAI's `tool_choice`, less `none` (no grammar, no tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides; a call it opens is constrained from its opening marker on.
    Auto,
    /// At least one call, and nothing but calls.
    Required,
    /// Exactly one call of this function.
    Function(String),
}

/// A grammar for tool calls and, for [`ToolChoice::Auto`], the text that switches it on
/// (`None`: it holds from the first token).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolGrammar {
    pub spec: GrammarSpec,
    pub trigger: Option<String>,
}

/// The id of `format`'s opening marker where `tokenizer` holds it as a control token (Mistral's
/// `[TOOL_CALLS]`, usually), for [`tool_call_grammar`].
pub fn control_marker(tokenizer: &Tokenizer, format: ToolCallFormat) -> Option<u32> {
    let id = tokenizer.token_id(format.call_marker()?)?;
    tokenizer.is_control(id).then_some(id)
}

/// `tools` are OpenAI tool objects (`{"type": "function", "function": {"name", "parameters"}}`).
/// `marker_token`: the id of the syntax's opening marker where the vocabulary holds it as a
/// control token (a grammar must then name the token, as text never spells it). `None` for
/// `Auto` where the syntax has no opening marker to trigger on (the model's calls are then
/// parsed, not constrained).
pub fn tool_call_grammar(
    format: ToolCallFormat,
    tools: &[Value],
    choice: &ToolChoice,
    marker_token: Option<u32>,
) -> Result<Option<ToolGrammar>, GrammarError> {
    // The opening marker in Lark: the control token by id, or the literal text.
    let open = |text: &str| match marker_token {
        Some(id) => format!("<[{id}]>"),
        None => format!("{text:?}"),
    };
    let args_key = match format {
        ToolCallFormat::Llama3 => "parameters",
        _ => "arguments",
    };
    let mut calls = Vec::new();
    for tool in tools {
        let f = tool.get("function").unwrap_or(tool);
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| GrammarError::Compile("a tool has no function name".to_owned()))?;
        if let ToolChoice::Function(want) = choice {
            if want != name {
                continue;
            }
        }
        let params = match f.get("parameters") {
            Some(p) if p.is_object() && p.as_object().is_some_and(|o| !o.is_empty()) => p.clone(),
            _ => json!({"type": "object"}),
        };
        calls.push(json!({
            "type": "object",
            "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": false,
        }));
    }
    if calls.is_empty() {
        return Err(GrammarError::Compile(match choice {
            ToolChoice::Function(name) => {
                format!("tool_choice names {name:?}, which is not among the tools")
            }
            _ => "tool_choice needs at least one tool".to_owned(),
        }));
    }
    let one_call = if calls.len() == 1 {
        calls.pop().expect("one call")
    } else {
        json!({"anyOf": calls})
    };
    let single = matches!(choice, ToolChoice::Function(_));
    let json = |schema: &Value| format!("%json {}", with_layout(schema.clone()));
    let lark = |body: String| GrammarSpec::Lark(body);
    let grammar = match (format, choice) {
        (ToolCallFormat::Hermes, ToolChoice::Auto) => ToolGrammar {
            spec: lark(format!(
                "start: \"\\n\" {} \"\\n</tool_call>\"\n",
                json(&one_call)
            )),
            trigger: Some("<tool_call>".to_owned()),
        },
        (ToolCallFormat::Hermes, _) => {
            let repeat = if single { "" } else { " (\"\\n\" call)*" };
            ToolGrammar {
                spec: lark(format!(
                    "start: call{repeat}\ncall: {} \"\\n\" {} \"\\n</tool_call>\"\n",
                    open("<tool_call>"),
                    json(&one_call)
                )),
                trigger: None,
            }
        }
        (ToolCallFormat::Mistral, choice) => {
            let mut array = json!({"type": "array", "items": one_call, "minItems": 1});
            if single {
                array["maxItems"] = json!(1);
            }
            match choice {
                ToolChoice::Auto => ToolGrammar {
                    spec: lark(format!("start: {}\n", json(&array))),
                    trigger: Some("[TOOL_CALLS]".to_owned()),
                },
                _ => ToolGrammar {
                    spec: lark(format!(
                        "start: {} {}\n",
                        open("[TOOL_CALLS]"),
                        json(&array)
                    )),
                    trigger: None,
                },
            }
        }
        (ToolCallFormat::Llama3, ToolChoice::Auto) => return Ok(None),
        (ToolCallFormat::Llama3, _) => {
            let repeat = if single { "" } else { " (\"; \" call)*" };
            ToolGrammar {
                spec: lark(format!("start: call{repeat}\ncall: {}\n", json(&one_call))),
                trigger: None,
            }
        }
        (ToolCallFormat::Generic, ToolChoice::Auto) => return Ok(None),
        (ToolCallFormat::Generic, _) => {
            let mut array = json!({"type": "array", "items": one_call, "minItems": 1});
            if single {
                array["maxItems"] = json!(1);
            }
            let wrapper = json!({
                "type": "object",
                "properties": {"tool_calls": array},
                "required": ["tool_calls"],
                "additionalProperties": false,
            });
            ToolGrammar {
                spec: GrammarSpec::JsonSchema(wrapper),
                trigger: None,
            }
        }
    };
    Ok(Some(grammar))
}
