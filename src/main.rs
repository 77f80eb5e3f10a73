//! The `edgelm` command line: thin wrappers over the engine.

mod chat;
mod compress;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgelm_chat::Message;
use edgelm_engine::{Engine, Event, Request, SamplingParams, Scheduler, SchedulerConfig};
use edgelm_grammar::{GrammarCompiler, GrammarSpec, Guide};
use edgelm_hub::{Hub, DEFAULT_MODEL};
use edgelm_kernels::{Compute, Isa, Precision};
use edgelm_models::{KvConfig, KvTypes, MemoryPlan};
use edgelm_tokenizer::Encode;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "edgelm",
    version,
    about = "Run, score and inspect GGUF language models on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Run(RunArgs),
    /// Chat interactively (or answer piped stdin turn by turn), streaming the answers.
    Chat(ChatArgs),
    /// Serve the OpenAI-compatible HTTP API (chat, completions, metrics).
    Serve(ServeCmd),
    /// Print the token ids of a text as a JSON list.
    Tokenize(TokenizeArgs),
    /// Print embeddings (pooled final hidden states, unit length) as JSON arrays, one line per
    /// input; with -f each non-empty line of the file is an input.
    Embed(EmbedArgs),
    /// Teacher-forced scoring: one JSON line per position with the log-probability of the next token.
    Score(ScoreArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Show a model's metadata, tensors by type, parameter count and memory estimate.
    Inspect(InspectArgs),
    /// Benchmark prompt processing (pp) and generation (tg) speed, llama-bench style.
    Bench(BenchArgs),
    /// Quantize a model to another type or mix, rounding by importance-weighted least squares.
    Quantize(compress::QuantizeArgs),
    /// Collect an importance matrix (mean squared input of every projection) from a text.
    Imatrix(compress::ImatrixArgs),
    /// Prune a model: zero weights (magnitude, Wanda, N:M) or remove FFN neurons, attention
    /// heads or whole blocks into a smaller dense model.
    Prune(compress::PruneArgs),
    /// Factor projections into low-rank pairs by (activation-aware) truncated SVD.
    Lowrank(compress::LowRankArgs),
    /// Download a known model into the cache.
    Pull {
        /// Model name (see `edgelm list`).
        name: String,
        /// Fetch again even if a verified copy is cached.
        #[arg(long)]
        force: bool,
    },
    /// List known models and which are cached.
    List,
}

#[derive(Args)]
struct ModelArgs {
    /// Model name (pulled if missing) or path to a GGUF file.
    #[arg(short = 'm', long = "model", default_value = DEFAULT_MODEL)]
    model: String,
    /// Threads (default: physical cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Use the precise path: f32 activations against dequantized weights (slower; the reference).
    #[arg(long)]
    precise: bool,
    /// Refuse a run the memory planner says needs more than this (e.g. 2G, 300M), saying what
    /// would fit (default: the memory available when it starts).
    #[arg(long = "mem-limit", value_name = "SIZE", value_parser = edgelm_server::parse_size)]
    mem_limit: Option<u64>,
    #[command(flatten)]
    kv: KvArgs,
}

/// How the KV cache stores keys and values.
#[derive(Args, Clone, Copy)]
struct KvArgs {
    /// Type of cached keys: f16 (default), q8_0, q4_0 or f32 (precise path: f32 only).
    #[arg(long = "cache-type-k", visible_alias = "ctk", value_name = "TYPE")]
    cache_type_k: Option<edgelm_models::KvType>,
    /// Type of cached values: f16 (default), q8_0, q4_0 or f32.
    #[arg(long = "cache-type-v", visible_alias = "ctv", value_name = "TYPE")]
    cache_type_v: Option<edgelm_models::KvType>,
    /// Hadamard rotation before caching: auto (each quantized side), off, keys, values or all.
    /// Keys turn with the queries and values with attention's output, so results are unchanged
    /// but for rounding, and quantized rows lose less.
    #[arg(long = "kv-rotation", value_name = "WHICH")]
    kv_rotation: Option<KvRotation>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KvRotation {
    Auto,
    Off,
    Keys,
    Values,
    All,
}

impl KvArgs {
    /// The types asked for over `default` (the path's), None if nothing was asked.
    fn types(&self, default: KvTypes) -> Option<KvTypes> {
        if self.cache_type_k.is_none() && self.cache_type_v.is_none() && self.kv_rotation.is_none()
        {
            return None;
        }
        let t = KvTypes::new(
            self.cache_type_k.unwrap_or(default.k),
            self.cache_type_v.unwrap_or(default.v),
        );
        let (rotate_keys, rotate_values) = match self.kv_rotation.unwrap_or(KvRotation::Auto) {
            KvRotation::Auto => (t.rotate_keys, t.rotate_values),
            KvRotation::Off => (false, false),
            KvRotation::Keys => (true, false),
            KvRotation::Values => (false, true),
            KvRotation::All => (true, true),
        };
        Some(KvTypes {
            rotate_keys,
            rotate_values,
            ..t
        })
    }
}

#[derive(Args)]
struct TextArgs {
    /// Text given inline.
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    prompt: Option<String>,
    /// Text read from a file.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
}

impl TextArgs {
    fn read(&self) -> Result<String> {
        match (&self.prompt, &self.file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => {
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
            }
            (None, None) => bail!("give the text with -p TEXT or -f FILE"),
        }
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temp: f32,
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    /// Random seed (default: from the clock). The same seed gives the same text.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long = "frequency-penalty", default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long = "presence-penalty", default_value_t = 0.0)]
    presence_penalty: f32,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            penalty_last_n: self.repeat_last_n,
            seed: self.seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            }),
        }
    }
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The system message.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per answer at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024)]
    n_predict: usize,
    /// Context length of the conversation (default: the model's).
    #[arg(short = 'c', long = "ctx", default_value_t = 0)]
    ctx: usize,
    #[command(flatten)]
    shift: ShiftArgs,
    /// Tools the model may call: a JSON file holding an OpenAI `tools` list. Calls are printed;
    /// answer them with /tool RESULT.
    #[arg(long, value_name = "FILE.json")]
    tools: Option<PathBuf>,
}

/// What happens when generation fills the context.
#[derive(Args)]
struct ShiftArgs {
    /// Go on when the context fills: keep the first --keep tokens, drop the oldest half of the
    /// rest and re-rotate the kept keys to their new positions (default: stop there).
    #[arg(long = "context-shift")]
    context_shift: bool,
    /// Tokens at the start a context shift never drops (the system prompt, say).
    #[arg(long, default_value_t = 0, requires = "context_shift")]
    keep: usize,
}

impl ShiftArgs {
    fn keep(&self) -> Option<usize> {
        self.context_shift.then_some(self.keep)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long = "ignore-eos")]
    ignore_eos: bool,
    /// Context length (default: the model's).
    #[arg(short = 'c', long = "ctx", default_value_t = 0)]
    ctx: usize,
    #[command(flatten)]
    shift: ShiftArgs,
    /// Send the text exactly as given, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// A system message before the prompt (with the chat template).
    #[arg(long, conflicts_with = "raw")]
    system: Option<String>,
    /// Constrain the output to JSON valid under this JSON schema (a file).
    #[arg(long = "json-schema", value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Constrain the output to any JSON object.
    #[arg(long, conflicts_with = "json_schema")]
    json: bool,
    /// Constrain the output to this grammar (a file in llguidance's Lark syntax).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json_schema", "json"])]
    grammar: Option<PathBuf>,
    /// Prompt cache: restore the keys and values saved in FILE (the prompt's common prefix with
    /// them is not recomputed), and save this run's there afterwards.
    #[arg(long, value_name = "FILE")]
    session: Option<PathBuf>,
}

impl RunArgs {
    /// The grammar the output must follow, if any was asked for.
    fn grammar_spec(&self) -> Result<Option<GrammarSpec>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        if let Some(path) = &self.json_schema {
            let schema: serde_json::Value = serde_json::from_str(&read(path)?)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            return Ok(Some(GrammarSpec::JsonSchema(schema)));
        }
        if let Some(path) = &self.grammar {
            return Ok(Some(GrammarSpec::Lark(read(path)?)));
        }
        Ok(self.json.then_some(GrammarSpec::JsonObject))
    }
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
    /// Do not add BOS even where the model does.
    #[arg(long = "no-bos")]
    no_bos: bool,
    /// Treat special-token text as plain text.
    #[arg(long = "no-special")]
    no_special: bool,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
    /// Context length (default: room for the longest input).
    #[arg(short = 'c', long = "ctx", default_value_t = 0)]
    ctx: usize,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score (tokenized with the model's defaults).
    #[arg(short = 'f', long = "file", conflicts_with = "ids")]
    file: Option<PathBuf>,
    /// Token ids, comma separated.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Highest logits reported per position.
    #[arg(long = "top", default_value_t = 20)]
    top: usize,
    #[arg(short = 'c', long = "ctx", default_value_t = 0)]
    ctx: usize,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Chunk length in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    ctx: usize,
    /// Write this run's log-probabilities of every scored position to FILE, the base of later
    /// `--kl-divergence` runs (about 2 bytes per vocabulary entry per position).
    #[arg(long = "kl-divergence-base", value_name = "FILE")]
    kl_base: Option<PathBuf>,
    /// Compare this run with the base in `--kl-divergence-base FILE`: KL divergence, Δp and
    /// same-top statistics as llama-perplexity prints them.
    #[arg(long = "kl-divergence", requires = "kl_base")]
    kl_divergence: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt sizes to time (tokens, processed as one batch).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    n_prompt: Vec<usize>,
    /// Generation lengths to time (tokens, one at a time).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_gen: Vec<usize>,
    /// Tokens already in the cache before each test (as llama-bench's -d): attention at depth.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    n_depth: Vec<usize>,
    /// Repetitions per test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,
    /// Output format.
    #[arg(short = 'o', long = "output", value_parser = ["md", "json"], default_value = "md")]
    output: String,
    /// Measure the memory read bandwidth before and after every generation run (512 MiB
    /// streamed by all threads) and report the share of it decoding draws: the weights one
    /// token reads, per second.
    #[arg(long)]
    bandwidth: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// Model name or GGUF path.
    model: String,
    /// Context length for the memory plan (default: the model's).
    #[arg(short = 'c', long = "ctx", default_value_t = 0)]
    ctx: usize,
    /// Sequences held at once (as `serve --parallel`).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Plan for the precise path (f32 KV cache) instead of the fast path (f16).
    #[arg(long)]
    precise: bool,
    /// Judge the plan against this much memory (default: the memory available now).
    #[arg(long = "mem-limit", value_name = "SIZE", value_parser = edgelm_server::parse_size)]
    mem_limit: Option<u64>,
    #[command(flatten)]
    kv: KvArgs,
}

#[derive(Args)]
struct ServeCmd {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    serve: edgelm_server::ServeArgs,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Run(a) => run(a),
        Command::Chat(a) => {
            let (engine, _) = load(&a.model)?;
            plan_memory(&a.model, &engine, &engine.kv_config(a.ctx))?;
            let cfg = SchedulerConfig {
                prefix_cache: true,
                context_shift: a.shift.keep(),
                ..SchedulerConfig::single(a.ctx)
            };
            let sched = Scheduler::new(engine, cfg)?;
            let tools = match &a.tools {
                Some(path) => Some(chat::Tools::load(path, &sched)?),
                None => None,
            };
            chat::Chat::new(sched, a.sampling.params(), a.n_predict, a.system, tools)?.run()
        }
        Command::Serve(mut a) => {
            let (engine, _) = load(&a.model)?;
            a.serve.kv_budget = serve_kv_budget(&a.model, &engine, &a.serve)?;
            edgelm_server::serve(engine, a.model.model.clone(), a.serve)
        }
        Command::Tokenize(a) => tokenize(a),
        Command::Embed(a) => embed(a),
        Command::Score(a) => score(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Inspect(a) => inspect(a),
        Command::Bench(a) => bench(a),
        Command::Quantize(a) => compress::quantize(a),
        Command::Imatrix(a) => compress::imatrix(a),
        Command::Prune(a) => compress::prune(a),
        Command::Lowrank(a) => compress::lowrank(a),
        Command::Pull { name, force } => {
            let hub = Hub::from_env()?;
            let spec = edgelm_hub::find(&name)
                .with_context(|| format!("unknown model {name:?}; known: {}", known_names()))?;
            let path = hub.pull(spec, force)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::List => list(),
    }
}

fn known_names() -> String {
    edgelm_hub::known_models()
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn resolve(model: &str) -> Result<PathBuf> {
    Ok(Hub::from_env()?.resolve(model)?)
}

/// The memory limit of a run: `--mem-limit`, else what the system has available now (None:
/// unknown, no check).
fn memory_limit(args: &ModelArgs) -> Option<(u64, &'static str)> {
    match args.mem_limit {
        Some(l) => Some((l, "--mem-limit")),
        None => edgelm_models::available_memory().map(|a| (a, "the memory available now")),
    }
}

/// The memory planner's verdict on a run with `kv`: an error that says what would fit if it
/// needs more than the limit.
fn plan_memory(args: &ModelArgs, engine: &Engine, kv: &KvConfig) -> Result<MemoryPlan> {
    let runtime = edgelm_models::runtime_memory(&engine.weight_files()).unwrap_or(0);
    let Some((limit, source)) = memory_limit(args) else {
        return Ok(edgelm_models::memory_plan(&engine.model, kv, runtime)?);
    };
    match edgelm_models::check_fits(&engine.model, kv, runtime, limit)? {
        Ok(plan) => Ok(plan),
        Err(e) => bail!("{e} ({source})"),
    }
}

/// `serve`'s KV budget: as given; else every sequence's full context where that fits the
/// memory limit, else the KV memory the limit leaves (sequences then share it, and admission
/// waits for room), or a refusal saying what fits when not even one sequence's context does.
fn serve_kv_budget(
    args: &ModelArgs,
    engine: &Engine,
    serve: &edgelm_server::ServeArgs,
) -> Result<Option<u64>> {
    let kv = KvConfig {
        max_seqs: serve.parallel.max(1),
        budget: serve.kv_budget,
        ..engine.kv_config(serve.ctx)
    };
    let Some((limit, source)) = memory_limit(args) else {
        return Ok(serve.kv_budget);
    };
    let runtime = edgelm_models::runtime_memory(&engine.weight_files()).unwrap_or(0);
    let full = match edgelm_models::check_fits(&engine.model, &kv, runtime, limit)? {
        Ok(_) => return Ok(serve.kv_budget),
        Err(e) => e,
    };
    if serve.kv_budget.is_some() {
        bail!("{full} ({source}); lower --kv-budget");
    }
    let one = KvConfig {
        max_seqs: 1,
        ..kv.clone()
    };
    if let Err(e) = edgelm_models::check_fits(&engine.model, &one, runtime, limit)? {
        bail!("{e} ({source})");
    }
    let room = limit - full.plan.weights - full.plan.scratch - full.plan.runtime;
    eprintln!(
        "edgelm: {} sequences × {} positions would need a KV cache of {:.1} MiB; sized to \
         {:.1} MiB to fit {source} (sequences share it; --kv-budget sets it)",
        kv.max_seqs,
        kv.n_ctx,
        full.plan.kv_cache as f64 / (1u64 << 20) as f64,
        room as f64 / (1u64 << 20) as f64
    );
    Ok(Some(room))
}

fn load(args: &ModelArgs) -> Result<(Engine, f64)> {
    let path = resolve(&args.model)?;
    let isa = Isa::from_env()?;
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match args.threads {
        // More threads than cores only queue behind each other: cap at what the process may use
        // (its affinity mask and CPU quota).
        Some(t) if t > usable => {
            eprintln!("edgelm: --threads {t} is more than the {usable} cores this process may use; using {usable}");
            usable
        }
        Some(t) => t.max(1),
        None => edgelm_kernels::physical_cores(),
    };
    let t0 = Instant::now();
    let precision = if args.precise {
        Precision::Precise
    } else {
        Precision::Fast
    };
    let mut engine = Engine::load(&path, Compute::with_precision(isa, threads, precision))
        .with_context(|| format!("loading {}", path.display()))?;
    if let Some(types) = args.kv.types(engine.kv_types()) {
        engine.set_kv_types(types)?;
    }
    Ok((engine, t0.elapsed().as_secs_f64() * 1e3))
}

fn run(a: RunArgs) -> Result<()> {
    let text = a.text.read()?;
    let grammar = a.grammar_spec()?;
    let (engine, load_ms) = load(&a.model)?;
    plan_memory(&a.model, &engine, &engine.kv_config(a.ctx))?;
    let guide = match &grammar {
        Some(spec) => {
            let compiler = GrammarCompiler::new(engine.tokenizer.clone())?;
            Some(Guide::new(compiler.compile(spec)?, None))
        }
        None => None,
    };
    // Instruct models answer a message; a model without a template continues the text.
    let prompt = if a.raw || !engine.has_chat_template() {
        if a.system.is_some() {
            bail!("--system needs a chat template, and this model has none; use --raw text");
        }
        engine.tokenizer.encode(&text, Encode::PROMPT)?
    } else {
        let mut messages = Vec::new();
        if let Some(sys) = &a.system {
            messages.push(Message::system(sys));
        }
        messages.push(Message::user(&text));
        engine.encode_chat(&messages, None)?
    };
    let sampling = a.sampling.params();
    let req = Request {
        stop: a.stop,
        ignore_eos: a.ignore_eos,
        guide,
        ..Request::new(prompt.clone(), a.n_predict, sampling)
    };
    let cfg = SchedulerConfig {
        prefix_cache: a.session.is_some(),
        context_shift: a.shift.keep(),
        ..SchedulerConfig::single(a.ctx)
    };
    let mut sched = Scheduler::new(engine, cfg)?;
    if let Some(path) = a.session.as_deref().filter(|p| p.exists()) {
        let saved = sched.load_session(path)?;
        let common = saved
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "session: {} tokens restored from {}, {common} of them start this prompt",
            saved.len(),
            path.display()
        );
    }
    // Events come back on this thread (the sink runs inside `step`); text goes straight out.
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = move |e: Event| {
        let text = match &e {
            Event::Token { text, .. } | Event::Done { text, .. } => text.clone(),
            _ => String::new(),
        };
        let mut out = std::io::stdout().lock();
        let written = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        // A closed stdout (a pipe whose reader left) ends the request.
        written.is_ok() && tx.send(e).is_ok()
    };
    sched.submit(req, Box::new(sink))?;
    sched.run_until_idle()?;
    let mut stats = None;
    for e in rx.try_iter() {
        match e {
            Event::Done {
                stats: s, reason, ..
            } => {
                if reason == edgelm_engine::FinishReason::ContextFull {
                    eprintln!(
                        "\nedgelm: stopped: the context of {} tokens is full; raise --ctx, or go on with --context-shift",
                        sched.n_ctx()
                    );
                }
                stats = Some(s);
            }
            Event::Error(msg) => bail!("{msg}"),
            _ => {}
        }
    }
    let stats = stats.context("writing to stdout failed; generation stopped")?;
    if let Some(path) = &a.session {
        let mut all = prompt;
        all.extend_from_slice(&stats.tokens);
        let saved = sched.save_session(path, &all)?;
        eprintln!(
            "session: {} prompt tokens reused; {saved} tokens saved to {}",
            stats.reused_tokens,
            path.display()
        );
    }
    let engine = sched.engine();
    println!();
    eprintln!(
        "load {:.0} ms | prompt {} tokens, {:.1} tok/s | first token {:.0} ms | generated {} tokens, {:.1} tok/s | {} threads, {} {:?}",
        load_ms,
        stats.prompt_tokens,
        stats.prompt_tokens_per_second(),
        stats.time_to_first_token.as_secs_f64() * 1e3,
        stats.generated_tokens,
        stats.decode_tokens_per_second(),
        engine.compute.n_threads(),
        engine.compute.isa(),
        engine.compute.precision(),
    );
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = a.text.read()?;
    let path = resolve(&a.model.model)?;
    let file = edgelm_gguf::GgufFile::open(&path)?;
    let tok = edgelm_tokenizer::Tokenizer::from_gguf(&file)?;
    let ids = tok.encode(
        &text,
        Encode {
            add_special: !a.no_bos,
            parse_special: !a.no_special,
        },
    )?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// Inputs `embed` batches together; short ones fit many to a step.
const EMBED_PARALLEL: usize = 16;

fn embed(a: EmbedArgs) -> Result<()> {
    // (where the input came from, for messages; its text)
    let inputs: Vec<(String, String)> = match (&a.text.prompt, &a.text.file) {
        (Some(p), _) if p.is_empty() => {
            bail!("the text given with -p is empty; give text to embed")
        }
        (Some(p), _) => vec![("the text".into(), p.clone())],
        (None, Some(f)) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let lines: Vec<_> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| (format!("line {} of {}", i + 1, f.display()), l.to_owned()))
                .collect();
            if lines.is_empty() {
                bail!(
                    "{} has no text to embed; write one input per line",
                    f.display()
                );
            }
            lines
        }
        (None, None) => bail!("give the text with -p TEXT or -f FILE (one input per line)"),
    };
    let (engine, _) = load(&a.model)?;
    let t0 = Instant::now();
    let prompts = inputs
        .iter()
        .map(|(_, text)| engine.tokenizer.encode(text, Encode::PROMPT))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // The KV cache holds --ctx positions per running input: by default no more than needed.
    let n_ctx = match a.ctx {
        0 => (longest + 1).min(engine.context_length(0)),
        c => c,
    };
    plan_memory(
        &a.model,
        &engine,
        &KvConfig {
            max_seqs: EMBED_PARALLEL,
            ..engine.kv_config(n_ctx)
        },
    )?;
    let cfg = SchedulerConfig {
        n_ctx,
        max_running: EMBED_PARALLEL,
        max_waiting: prompts.len(),
        step_tokens: edgelm_models::MAX_CHUNK,
        kv_budget: None,
        prefix_cache: false,
        context_shift: None,
    };
    let mut sched = Scheduler::new(engine, cfg)?;
    let n_tokens: usize = prompts.iter().map(Vec::len).sum();
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let tx = tx.clone();
        let sink = move |e: Event| tx.send((i, e)).is_ok();
        sched
            .submit(Request::embedding(prompt), Box::new(sink))
            .with_context(|| format!("embedding {}", inputs[i].0))?;
    }
    sched.run_until_idle()?;
    let mut vectors = vec![None; inputs.len()];
    for (i, e) in rx.try_iter() {
        match e {
            Event::Embedding(v) => vectors[i] = Some(v),
            Event::Error(msg) => bail!("embedding {}: {msg}", inputs[i].0),
            _ => {}
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (v, (what, _)) in vectors.iter().zip(&inputs) {
        let v = v
            .as_ref()
            .with_context(|| format!("the engine gave no embedding for {what}"))?;
        writeln!(out, "{}", serde_json::to_string(v)?).context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    eprintln!(
        "embedded {} inputs ({n_tokens} tokens) in {:.0} ms",
        inputs.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn score(a: ScoreArgs) -> Result<()> {
    let (engine, _) = load(&a.model)?;
    let ids = match (&a.ids, &a.file) {
        (Some(ids), _) => ids.clone(),
        (None, Some(f)) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            engine.tokenizer.encode(&text, Encode::PROMPT)?
        }
        (None, None) => bail!("give the tokens with --ids 1,2,3 or a text with -f FILE"),
    };
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= engine.model.hp.n_vocab) {
        bail!(
            "token id {bad} is outside the vocabulary ({} tokens)",
            engine.model.hp.n_vocab
        );
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write_err = None;
    edgelm_engine::score(&engine, &ids, a.top, a.ctx, &mut |s| {
        let top: Vec<(u32, f32)> = s.top;
        let line =
            serde_json::json!({"pos": s.pos, "next": s.next, "logprob": s.logprob, "top": top});
        if let Err(e) = writeln!(out, "{line}") {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    out.flush()?;
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let (engine, _) = load(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let add_bos = engine.tokenizer.adds_bos();
    let tokens = engine.tokenizer.encode(
        &text,
        Encode {
            add_special: add_bos,
            parse_special: false,
        },
    )?;
    eprintln!(
        "perplexity: {} tokens, {} chunks of {}",
        tokens.len(),
        tokens.len() / a.ctx.max(1),
        a.ctx
    );
    let t0 = Instant::now();
    let n_vocab = engine.model.hp.n_vocab;
    let mut writer = None;
    let mut reader = None;
    match (&a.kl_base, a.kl_divergence) {
        (Some(path), false) => {
            writer = Some(edgelm_engine::BaseWriter::create(
                path, a.ctx, n_vocab, &tokens,
            )?)
        }
        (Some(path), true) => {
            reader = Some(edgelm_engine::BaseReader::open(
                path, a.ctx, n_vocab, &tokens,
            )?)
        }
        (None, _) => {}
    }
    let mut stats = edgelm_engine::KlStats::default();
    let mut base = Vec::new();
    let r = edgelm_engine::perplexity_rows(
        &engine,
        &tokens,
        a.ctx,
        &mut |c| eprint!("[{}]{:.4},", c.index + 1, c.ppl),
        &mut |logits, next| {
            if let Some(w) = writer.as_mut() {
                w.row(logits)?;
            }
            if let Some(r) = reader.as_mut() {
                r.next_row(&mut base)?;
                stats.add(&base, logits, next);
            }
            Ok(())
        },
    )?;
    if let Some(w) = writer {
        w.finish()?;
    }
    if let Some(r) = reader {
        r.finish()?;
    }
    eprintln!(
        "\n{:.1} s, {:.1} tokens/s",
        t0.elapsed().as_secs_f64(),
        (r.n_chunks * a.ctx) as f64 / t0.elapsed().as_secs_f64()
    );
    println!("PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_err);
    if let Some(summary) = stats.summary() {
        println!("\n{summary}");
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let path = resolve(&a.model)?;
    let file = std::sync::Arc::new(edgelm_gguf::GgufFile::open(&path)?);
    println!(
        "file: {} ({} bytes, GGUF v{}, alignment {})",
        path.display(),
        file.bytes().len(),
        file.version,
        file.alignment
    );
    println!("\nmetadata:");
    for (k, v) in file.metadata() {
        if k == "tokenizer.chat_template" {
            println!("  {k} = <{} chars>", v.as_str().map_or(0, str::len));
        } else {
            println!("  {k} = {}", v.display_short());
        }
    }
    let mut by_type: Vec<(edgelm_gguf::GgmlType, usize, u64, u64)> = Vec::new();
    for t in file.tensors() {
        match by_type.iter_mut().find(|e| e.0 == t.ty) {
            Some(e) => {
                e.1 += 1;
                e.2 += t.n_elements;
                e.3 += t.n_bytes;
            }
            None => by_type.push((t.ty, 1, t.n_elements, t.n_bytes)),
        }
    }
    by_type.sort_by_key(|e| std::cmp::Reverse(e.3));
    let params: u64 = file.tensors().iter().map(|t| t.n_elements).sum();
    println!(
        "\ntensors: {} ({} parameters, {:.1} M)",
        file.tensors().len(),
        params,
        params as f64 / 1e6
    );
    println!(
        "  {:<6} {:>7} {:>14} {:>12} {:>8}",
        "type", "tensors", "elements", "MiB", "bits/w"
    );
    for (ty, n, elems, bytes) in &by_type {
        println!(
            "  {:<6} {:>7} {:>14} {:>12.1} {:>8.2}",
            ty.name(),
            n,
            elems,
            *bytes as f64 / (1 << 20) as f64,
            *bytes as f64 * 8.0 / *elems as f64
        );
    }
    match edgelm_models::load(file.clone()) {
        Ok(model) => {
            let n_ctx = if a.ctx == 0 {
                model.hp.n_ctx_train
            } else {
                a.ctx
            };
            let path_types = KvTypes::from(if a.precise {
                edgelm_models::KvType::F32
            } else {
                edgelm_models::KvType::F16
            });
            let ty = a.kv.types(path_types).unwrap_or(path_types);
            if a.precise && ty != path_types {
                bail!("the precise path keeps an f32 KV cache; drop --precise or the cache-type options");
            }
            let kv = KvConfig {
                max_seqs: a.parallel.max(1),
                ..KvConfig::new(n_ctx, ty)
            };
            // What a run holds before it starts: this process with the tokenizer loaded too.
            let tokenizer = edgelm_tokenizer::Tokenizer::from_gguf(&file);
            let runtime = edgelm_models::runtime_memory(std::slice::from_ref(&path)).unwrap_or(0);
            drop(tokenizer);
            let plan = edgelm_models::memory_plan(&model, &kv, runtime)?;
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let hp = &model.hp;
            println!(
                "\nmodel: {} | {} layers | d_model {} | heads {}/{} × {} | ffn {} | vocab {} | trained context {}",
                hp.arch,
                hp.layers.len(),
                hp.n_embd,
                hp.layers.first().map_or(0, |l| l.n_head),
                hp.layers.first().map_or(0, |l| l.n_head_kv),
                hp.head_dim,
                hp.layers.first().map_or(0, |l| l.n_ff),
                hp.n_vocab,
                hp.n_ctx_train
            );
            println!(
                "\nmemory plan: context {n_ctx} × {} sequences, {ty} KV cache ({} path)",
                kv.max_seqs,
                if a.precise { "precise" } else { "fast" }
            );
            println!(
                "  weights   {:>10.1} MiB (mapped; repacked copies replace the mapped pages)",
                mib(plan.weights)
            );
            println!(
                "  KV cache  {:>10.1} MiB ({:.1} KiB per position per sequence)",
                mib(plan.kv_cache),
                plan.kv_cache as f64 / 1024.0 / (n_ctx * kv.max_seqs) as f64
            );
            println!("  scratch   {:>10.1} MiB", mib(plan.scratch));
            println!(
                "  runtime   {:>10.1} MiB (code, tokenizer, metadata: measured)",
                mib(plan.runtime)
            );
            println!("  total     {:>10.1} MiB", mib(plan.total()));
            let limit = match a.mem_limit {
                Some(l) => Some((l, "--mem-limit")),
                None => edgelm_models::available_memory().map(|m| (m, "available now")),
            };
            if let Some((limit, source)) = limit {
                match edgelm_models::check_fits(&model, &kv, runtime, limit)? {
                    Ok(_) => println!("  fits in {:.1} MiB ({source})", mib(limit)),
                    Err(e) => println!("  does not fit: {e} ({source})"),
                }
            }
        }
        Err(e) => println!("\nmodel: cannot be run by edgelm: {e}"),
    }
    match edgelm_models::repack_cache::inspect(&path, &file) {
        Some((cache, entries)) => {
            let bytes: u64 = entries.iter().map(|e| e.len).sum();
            println!(
                "\nrepacked layout: cached at {} ({} weights, {:.1} MiB), mapped by runs instead of repacking",
                cache.display(),
                entries.len(),
                bytes as f64 / (1 << 20) as f64
            );
        }
        None => println!(
            "\nrepacked layout: no valid cache at {} (the next fast-path run writes it)",
            edgelm_models::repack_cache::cache_path(&path).display()
        ),
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    use edgelm_engine::bench::{
        fill_depth, mean_sd, median, time_generation, time_prompt, BandwidthProbe,
    };
    let (engine, load_ms) = load(&a.model)?;
    let reps = a.repetitions.max(1);
    let base = std::path::Path::new(&a.model.model)
        .file_name()
        .map_or(a.model.model.clone(), |s| s.to_string_lossy().into_owned());
    let name = base.strip_suffix(".gguf").unwrap_or(&base).to_owned();
    let size_mib = engine.model.file().bytes().len() as f64 / (1 << 20) as f64;
    let params: u64 = engine
        .model
        .file()
        .tensors()
        .iter()
        .map(|t| t.n_elements)
        .sum();
    let threads = engine.compute.n_threads();
    let isa = engine.compute.isa();
    let probe = a.bandwidth.then(BandwidthProbe::new);
    let token_bytes = engine.model.decode_weight_bytes();
    let mut rows = Vec::new();
    let tests = a
        .n_prompt
        .iter()
        .map(|&n| ("pp", n))
        .chain(a.n_gen.iter().map(|&n| ("tg", n)));
    let tests: Vec<(&str, usize)> = tests.filter(|t| t.1 > 0).collect();
    for (depth, (kind, n)) in a
        .n_depth
        .iter()
        .flat_map(|&d| tests.iter().map(move |&t| (d, t)))
    {
        // The filled context and one fork of it at a time.
        let kv = KvConfig {
            max_seqs: 2,
            ..engine.kv_config(depth + n + 1)
        };
        let mut cache = edgelm_models::KvCache::new(&engine.model.hp, kv)?;
        let mut scratch = edgelm_models::Scratch::default();
        let seq = fill_depth(&engine, &mut cache, &mut scratch, depth)?;
        let mut run = |seed| match kind {
            "pp" => time_prompt(&engine, &mut cache, &mut scratch, seq, depth, n, seed),
            _ => time_generation(&engine, &mut cache, &mut scratch, seq, depth, n, seed),
        };
        run(0)?; // warm-up: page in the weights, size the buffers and the KV cache
        let probe = probe.as_ref().filter(|_| kind == "tg");
        let mut secs = Vec::with_capacity(reps);
        let mut read_gbps = Vec::new();
        for r in 0..reps {
            read_gbps.extend(probe.map(|p| p.read_gbps(&engine.compute)));
            secs.push(run(r as u64 + 1)?.as_secs_f64());
        }
        read_gbps.extend(probe.map(|p| p.read_gbps(&engine.compute)));
        let tps: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
        let (mean, sd) = mean_sd(&tps);
        let (mean_ms, _) = mean_sd(&secs);
        let mut row = serde_json::json!({
            "model": name, "size_bytes": engine.model.file().bytes().len(), "params": params,
            "isa": isa.to_string(), "precision": format!("{:?}", engine.compute.precision()).to_lowercase(), "threads": threads, "kv_types": engine.kv_types().to_string(),
            "test": if depth > 0 { format!("{kind}{n} @ d{depth}") } else { format!("{kind}{n}") }, "n_depth": depth,
            "n_prompt": if kind == "pp" { n } else { 0 }, "n_gen": if kind == "tg" { n } else { 0 },
            "avg_ts": mean, "stddev_ts": sd, "samples_ts": tps, "avg_ms": mean_ms * 1e3,
        });
        if !read_gbps.is_empty() {
            // Each run against the mean of the readings taken on either side of it.
            let weight_gbps: Vec<f64> = tps.iter().map(|t| t * token_bytes as f64 / 1e9).collect();
            let share: Vec<f64> = weight_gbps
                .iter()
                .zip(read_gbps.windows(2))
                .map(|(w, around)| w / ((around[0] + around[1]) / 2.0))
                .collect();
            row["weight_bytes_per_token"] = token_bytes.into();
            row["weight_gbps_samples"] = weight_gbps.into();
            row["read_gbps_samples"] = read_gbps.into();
            row["bandwidth_share_samples"] = share.into();
        }
        rows.push(row);
    }
    let peak = edgelm_models::peak_resident_memory().unwrap_or(0);
    if a.output == "json" {
        let doc = serde_json::json!({"load_ms": load_ms, "peak_rss_bytes": peak, "results": rows});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("| model | size | params | backend | threads | test | t/s |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.2} MiB | {:.2} M | CPU {} {} | {} | {} | {:.2} ± {:.2} |",
            name,
            size_mib,
            params as f64 / 1e6,
            isa,
            r["precision"].as_str().unwrap_or(""),
            threads,
            r["test"].as_str().unwrap_or(""),
            r["avg_ts"].as_f64().unwrap_or(0.0),
            r["stddev_ts"].as_f64().unwrap_or(0.0)
        );
    }
    println!();
    for r in rows
        .iter()
        .filter(|r| r["n_prompt"].as_u64().unwrap_or(0) > 0)
    {
        println!(
            "time to first token, {} prompt tokens: {:.1} ms",
            r["n_prompt"],
            r["avg_ms"].as_f64().unwrap_or(0.0)
        );
    }
    let samples = |r: &serde_json::Value, key: &str| -> Vec<f64> {
        r[key]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    for r in rows.iter().filter(|r| r.get("read_gbps_samples").is_some()) {
        let share = samples(r, "bandwidth_share_samples");
        let (lo, hi) = share
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        println!(
            "{}: {:.1} MB of weights per token at {:.1} GB/s against {:.1} GB/s read \
             bandwidth: {:.0}% (median of runs; {:.0}–{:.0}%)",
            r["test"].as_str().unwrap_or(""),
            token_bytes as f64 / 1e6,
            median(&samples(r, "weight_gbps_samples")),
            median(&samples(r, "read_gbps_samples")),
            100.0 * median(&share),
            100.0 * lo,
            100.0 * hi
        );
    }
    println!(
        "load: {load_ms:.0} ms | peak RSS: {:.1} MiB",
        peak as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn list() -> Result<()> {
    let hub = Hub::from_env()?;
    let cached = hub.list()?;
    println!("{:<30} {:>10}  {:<8} description", "name", "MiB", "cached");
    for spec in edgelm_hub::known_models() {
        let c = cached.iter().find(|c| c.name == spec.name);
        println!(
            "{:<30} {:>10.1}  {:<8} {}",
            spec.name,
            spec.size as f64 / (1 << 20) as f64,
            if c.is_some_and(|c| c.verified) {
                "yes"
            } else if c.is_some() {
                "unverified"
            } else {
                "no"
            },
            spec.description,
        );
    }
    println!("cache: {}", hub.models_dir().display());
    Ok(())
}
