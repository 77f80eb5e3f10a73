//! `edgelm chat`: an interactive conversation that streams. The scheduler keeps the prefix
//! cache across turns, so each turn prefills only what is new since the last one.

use anyhow::{bail, Context, Result};
use edgelm_chat::tools::{parse_tool_calls, ToolCallFormat};
use edgelm_chat::Message;
use edgelm_engine::{Event, Request, SamplingParams, Scheduler, SequenceStats};
use edgelm_grammar::{control_marker, tool_call_grammar, GrammarCompiler, Guide, ToolChoice};
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

const HELP: &str = "\
Type a message and press Enter; end a line with \\ to continue it, or put \"\"\" on lines of
their own around a multi-line message. Ctrl-C stops an answer (twice at the prompt: quit).
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message (empty TEXT removes it)
  /save FILE      save the conversation as JSON, and its KV state as FILE.kv
  /load FILE      load a conversation saved by /save (its KV state too: not recomputed)
  /stats          tokens prefilled and reused in the last turn, and its speed
  /tool TEXT      answer the model's pending tool call with TEXT (with --tools)
  /help           this text
  /exit           leave (so does Ctrl-D)";

/// The conversation as /save writes it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    system: Option<String>,
    messages: Vec<serde_json::Value>,
}

pub struct Chat {
    sched: Scheduler,
    sampling: SamplingParams,
    max_tokens: usize,
    system: Option<String>,
    messages: Vec<serde_json::Value>,
    last: Option<SequenceStats>,
    /// Tokens of the last turn's prompt and answer: what /save keeps the KV state of.
    context: Vec<u32>,
    interrupted: Arc<AtomicBool>,
    tools: Option<Tools>,
}

/// What `--tools` sets up: the list shown to the model, the syntax its calls are parsed from,
/// and the grammar that holds a call it opens to the tools' parameter schemas.
pub struct Tools {
    list: Vec<Value>,
    format: ToolCallFormat,
    guide: Option<Guide>,
    /// Calls of the last answer not yet answered by /tool, oldest first.
    pending: Vec<String>,
    /// Calls made so far (their ids count them).
    made: usize,
}

impl Tools {
    /// Reads an OpenAI `tools` list (a JSON array of `{"type": "function", "function": …}`).
    pub fn load(path: &Path, sched: &Scheduler) -> Result<Tools> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: Vec<Value> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a JSON list of OpenAI tool objects",
                path.display()
            )
        })?;
        let engine = sched.engine();
        let format = ToolCallFormat::detect(engine.tokenizer.chat_template().unwrap_or(""));
        let marker = control_marker(&engine.tokenizer, format);
        let guide = match tool_call_grammar(format, &list, &ToolChoice::Auto, marker)
            .with_context(|| format!("the tools in {}", path.display()))?
        {
            Some(g) => {
                let compiler = GrammarCompiler::new(engine.tokenizer.clone())?;
                Some(Guide::new(compiler.compile(&g.spec)?, g.trigger))
            }
            None => None,
        };
        Ok(Tools {
            list,
            format,
            guide,
            pending: Vec::new(),
            made: 0,
        })
    }
}

impl Chat {
    pub fn new(
        sched: Scheduler,
        sampling: SamplingParams,
        max_tokens: usize,
        system: Option<String>,
        tools: Option<Tools>,
    ) -> Result<Chat> {
        let interrupted = Arc::new(AtomicBool::new(false));
        // A second Ctrl-C before the first was handled (at the prompt) quits.
        signal_hook::flag::register_conditional_shutdown(
            signal_hook::consts::SIGINT,
            130,
            interrupted.clone(),
        )
        .context("installing the Ctrl-C handler")?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())
            .context("installing the Ctrl-C handler")?;
        Ok(Chat {
            sched,
            sampling,
            max_tokens,
            system,
            messages: Vec::new(),
            last: None,
            context: Vec::new(),
            interrupted,
            tools,
        })
    }

    /// Answer what stdin says, turn by turn, until it ends or /exit.
    pub fn run(&mut self) -> Result<()> {
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        let mut input = stdin.lock();
        if interactive {
            println!("edgelm chat: /help for commands, Ctrl-D or /exit to leave");
        }
        while let Some(text) = read_message(&mut input, interactive)? {
            self.interrupted.store(false, Ordering::Relaxed);
            if let Some(cmd) = text.strip_prefix('/') {
                match self.command(cmd) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        continue;
                    }
                }
            }
            if let Err(e) = self.turn(Some(&text)) {
                eprintln!("error: {e:#}");
            }
        }
        Ok(())
    }

    /// Run a command; false means leave.
    fn command(&mut self, cmd: &str) -> Result<bool> {
        let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let arg = arg.trim();
        match name {
            "exit" | "quit" => return Ok(false),
            "help" => println!("{HELP}"),
            "reset" => {
                self.messages.clear();
                println!("(conversation cleared)");
            }
            "system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_owned());
                println!("(system message {})", if arg.is_empty() { "removed" } else { "set" });
            }
            "save" => {
                if arg.is_empty() {
                    bail!("give a file: /save FILE");
                }
                let saved = Saved {
                    system: self.system.clone(),
                    messages: self.messages.clone(),
                };
                std::fs::write(arg, serde_json::to_string_pretty(&saved)? + "\n")
                    .with_context(|| format!("writing {arg}"))?;
                let kv = kv_path(arg);
                let positions = self.sched.save_session(&kv, &self.context)?;
                if positions == 0 {
                    // Nothing cached to keep: no state file, and none left from before.
                    let _ = std::fs::remove_file(&kv);
                }
                println!(
                    "(saved {} messages to {arg}, the KV state of {positions} tokens to {})",
                    self.messages.len(),
                    kv.display()
                );
            }
            "load" => {
                if arg.is_empty() {
                    bail!("give a file: /load FILE");
                }
                let saved = load_conversation(Path::new(arg))?;
                // The KV state is optional (a conversation saved with nothing said); a bad one
                // refuses the whole load.
                let kv = kv_path(arg);
                let restored = if kv.exists() {
                    self.sched.load_session(&kv)?.len()
                } else {
                    0
                };
                self.system = saved.system;
                self.messages = saved.messages;
                println!(
                    "(loaded {} messages from {arg}; {restored} tokens of KV state restored)",
                    self.messages.len()
                );
            }
            "tool" => {
                let Some(tools) = self.tools.as_mut() else {
                    bail!("/tool answers tool calls, and this chat has no tools (--tools FILE)");
                };
                if tools.pending.is_empty() {
                    bail!("no tool call is waiting for an answer");
                }
                let id = tools.pending.remove(0);
                self.messages.push(Message::tool(&id, arg));
                if self.tools.as_ref().is_some_and(|t| t.pending.is_empty()) {
                    self.turn(None)?;
                }
            }
            "stats" => match &self.last {
                None => println!("(no turn yet)"),
                Some(s) => println!(
                    "prompt {} tokens: {} reused from the cache, {} prefilled | first token {:.0} ms | generated {} tokens, {:.1} tok/s",
                    s.prompt_tokens,
                    s.reused_tokens,
                    s.prompt_tokens - s.reused_tokens,
                    s.time_to_first_token.as_secs_f64() * 1e3,
                    s.generated_tokens,
                    s.decode_tokens_per_second()
                ),
            },
            _ => bail!("unknown command /{name}; /help lists them"),
        }
        Ok(true)
    }

    /// One user message (or none, after tool results) and the streamed answer.
    fn turn(&mut self, text: Option<&str>) -> Result<()> {
        let mut messages: Vec<serde_json::Value> =
            self.system.iter().map(|s| Message::system(s)).collect();
        messages.extend(self.messages.iter().cloned());
        messages.extend(text.map(Message::user));
        let tools = self.tools.as_ref().map(|t| t.list.as_slice());
        let prompt = self.sched.engine().encode_chat(&messages, tools)?;
        let (tx, rx) = mpsc::channel();
        let interrupted = self.interrupted.clone();
        let sink = Box::new(StdoutSink { tx, interrupted });
        let mut req = Request::new(prompt.clone(), self.max_tokens, self.sampling.clone());
        req.guide = self.tools.as_ref().and_then(|t| t.guide.clone());
        self.sched.submit(req, sink)?;
        self.sched.run_until_idle()?;
        println!();
        let mut answer = String::new();
        for e in rx.try_iter() {
            match e {
                Event::Token { text, .. } => answer.push_str(&text),
                Event::Done { text, stats, .. } => {
                    answer.push_str(&text);
                    self.context = prompt.iter().chain(&stats.tokens).copied().collect();
                    self.last = Some(stats);
                }
                Event::Error(msg) => bail!("{msg}"),
                Event::PromptLogprobs(_) | Event::Embedding(_) => {}
            }
        }
        if self.interrupted.swap(false, Ordering::Relaxed) {
            println!("(stopped)");
        }
        // An answer cut short still happened: the next turn sees what was said.
        self.messages.extend(text.map(Message::user));
        let reply = self.assistant_message(&answer);
        self.messages.push(reply);
        self.sampling.seed = self.sampling.seed.wrapping_add(1);
        Ok(())
    }

    /// The answer as the conversation keeps it: with tools, its calls parsed out (templates
    /// show them in their own syntax, arguments as objects) and announced for /tool.
    fn assistant_message(&mut self, answer: &str) -> Value {
        let Some(tools) = self.tools.as_mut() else {
            return Message::assistant(answer);
        };
        let parsed = parse_tool_calls(tools.format, answer);
        if parsed.calls.is_empty() {
            return Message::assistant(answer);
        }
        let mut calls = Vec::new();
        for call in &parsed.calls {
            let id = call
                .id
                .clone()
                .unwrap_or_else(|| format!("call_{}", tools.made));
            tools.made += 1;
            let args: Value = serde_json::from_str(&call.arguments).unwrap_or(json!({}));
            println!(
                "(tool call {id}: {}({}); answer with /tool RESULT)",
                call.name, call.arguments
            );
            tools.pending.push(id.clone());
            calls.push(json!({"id": id, "type": "function",
                              "function": {"name": call.name, "arguments": args}}));
        }
        json!({"role": "assistant", "content": parsed.content, "tool_calls": calls})
    }
}

/// Streams a turn's text to stdout; Ctrl-C or a closed stdout ends the answer.
struct StdoutSink {
    tx: mpsc::Sender<Event>,
    interrupted: Arc<AtomicBool>,
}

impl edgelm_engine::Sink for StdoutSink {
    fn send(&mut self, event: Event) -> bool {
        if let Event::Token { text, .. } | Event::Done { text, .. } = &event {
            let mut out = std::io::stdout().lock();
            if out
                .write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                return false;
            }
        }
        self.tx.send(event).is_ok() && !self.is_closed()
    }

    fn is_closed(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }
}

/// Where /save keeps a conversation's KV state: beside it, `.kv` appended.
fn kv_path(conversation: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{conversation}.kv"))
}

fn load_conversation(path: &Path) -> Result<Saved> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a conversation saved by /save", path.display()))?;
    for (i, m) in saved.messages.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        if !matches!(role, Some("user" | "assistant" | "system" | "tool")) {
            bail!("{}: message {i} has no valid role", path.display());
        }
    }
    Ok(saved)
}

/// The next message: one line, lines joined by a trailing `\`, or a `"""` block. None at the
/// end of input.
fn read_message(input: &mut impl BufRead, interactive: bool) -> Result<Option<String>> {
    let prompt = |p: &str| {
        if interactive {
            print!("{p}");
            let _ = std::io::stdout().flush();
        }
    };
    let mut line = String::new();
    loop {
        prompt("> ");
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let first = line.trim_end_matches(['\n', '\r']);
        if first.trim().is_empty() {
            continue;
        }
        if first.trim() == "\"\"\"" {
            let mut block = Vec::new();
            loop {
                prompt("... ");
                line.clear();
                if input.read_line(&mut line)? == 0 {
                    break;
                }
                let l = line.trim_end_matches(['\n', '\r']);
                if l.trim() == "\"\"\"" {
                    break;
                }
                block.push(l.to_owned());
            }
            return Ok(Some(block.join("\n")));
        }
        let mut text = first.to_owned();
        while text.ends_with('\\') {
            text.pop();
            text.push('\n');
            prompt("... ");
            line.clear();
            if input.read_line(&mut line)? == 0 {
                break;
            }
            text.push_str(line.trim_end_matches(['\n', '\r']));
        }
        return Ok(Some(text.trim().to_owned()));
    }
}
