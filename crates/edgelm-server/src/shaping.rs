//! What shapes a request's output besides sampling: the grammar its tokens must follow
//! (`response_format`, forced or opened tool calls) and the tool-call syntax its text is parsed
//! with.

use crate::api::{OutputFormat, Params, Prompt, ToolChoice};
use crate::error::ApiError;
use edgelm_chat::tools::ToolCallFormat;
use edgelm_grammar::{
    tool_call_grammar, GrammarCompiler, GrammarSpec, Guide, ToolChoice as Forced,
};

/// How one request's output is shaped.
pub struct Shaping {
    pub guide: Option<Guide>,
    /// The syntax tool calls are parsed from (None: the request offers no tools).
    pub tools: Option<ToolCallFormat>,
}

/// The guide and tool parsing for `p`. A grammar that cannot be compiled is the client's
/// mistake (a 400 naming the field); a model whose vocabulary cannot drive grammars is not.
pub fn shaping(
    p: &Params,
    compiler: &Result<GrammarCompiler, String>,
    format: ToolCallFormat,
    marker_token: Option<u32>,
) -> Result<Shaping, ApiError> {
    let compiler = || {
        compiler.as_ref().map_err(|reason| {
            ApiError::internal(format!(
                "this model's vocabulary cannot drive constrained decoding ({reason}); \
                 leave out response_format and forced tool calls"
            ))
        })
    };
    let compile = |spec: &GrammarSpec, param: &str| {
        compiler()?
            .compile(spec)
            .map_err(|e| ApiError::field(param, e.to_string()))
    };
    let tools = match &p.prompt {
        Prompt::Chat {
            tools: Some(tools), ..
        } if p.tool_choice != ToolChoice::None => Some(tools),
        _ => None,
    };
    let format_spec = match &p.format {
        OutputFormat::Text => None,
        OutputFormat::JsonObject => Some(GrammarSpec::JsonObject),
        OutputFormat::JsonSchema(s) => Some(GrammarSpec::JsonSchema(s.clone())),
    };
    // A response format shapes the whole answer; calls are then not possible.
    if let Some(spec) = format_spec {
        let c = compile(&spec, "response_format")?;
        return Ok(Shaping {
            guide: Some(Guide::new(c, None)),
            tools: None,
        });
    }
    let Some(tools) = tools else {
        return Ok(Shaping {
            guide: None,
            tools: None,
        });
    };
    let forced = match &p.tool_choice {
        ToolChoice::Required => Forced::Required,
        ToolChoice::Function(name) => Forced::Function(name.clone()),
        ToolChoice::Auto | ToolChoice::None => Forced::Auto,
    };
    let grammar = tool_call_grammar(format, tools, &forced, marker_token)
        .map_err(|e| ApiError::field("tools", e.to_string()))?;
    let guide = match grammar {
        Some(g) => Some(Guide::new(compile(&g.spec, "tools")?, g.trigger)),
        None => None,
    };
    Ok(Shaping {
        guide,
        tools: Some(format),
    })
}
