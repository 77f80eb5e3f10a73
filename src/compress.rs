//! `edgelm quantize`: the command-line edge of `edgelm-compress`.

use anyhow::{bail, Context, Result};
use clap::Args;
use edgelm_compress::imatrix::Imatrix;
use edgelm_compress::mix::{self, FileType, Overrides};
use edgelm_compress::quantize::{self, QuantizeOptions};
use edgelm_gguf::{GgmlType, GgufFile};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Source model: a GGUF path or a known model name (any type edgelm reads; quantized
    /// tensors are dequantized first).
    input: String,
    /// Output GGUF path (written under a temporary name, renamed when complete).
    output: PathBuf,
    /// File type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q2_K, Q2_K_S,
    /// Q3_K_S, Q3_K_M (Q3_K), Q3_K_L, Q4_K_S, Q4_K_M (Q4_K), Q5_K_S, Q5_K_M (Q5_K), Q6_K.
    #[arg(long = "type", value_name = "T", value_parser = parse_file_type)]
    file_type: FileType,
    /// Importance matrix (llama.cpp's GGUF or legacy .dat format) weighting the rounding.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// Type for tensors whose name matches REGEX, replacing the mix rules (first match wins;
    /// repeatable), e.g. `--tensor-type 'ffn_down=q6_k'`.
    #[arg(long = "tensor-type", value_name = "REGEX=TYPE", value_parser = parse_tensor_type)]
    tensor_types: Vec<(String, GgmlType)>,
    /// Type of the token embedding table.
    #[arg(long = "token-embedding-type", value_name = "T", value_parser = parse_type)]
    token_embedding_type: Option<GgmlType>,
    /// Type of the output head (and of a tied embedding table).
    #[arg(long = "output-tensor-type", value_name = "T", value_parser = parse_type)]
    output_tensor_type: Option<GgmlType>,
    /// Every weight at the file type's base type: no mix rules (rows that do not fit its
    /// blocks still fall back).
    #[arg(long)]
    pure: bool,
    /// Threads (default: physical cores).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Calibration text: the source model runs over it, and each block's rounding error is
    /// carried into the columns not yet rounded where its inputs' second moments say it costs
    /// least (GPTQ's error feedback). Lower error, slower: the moments take the square of each
    /// projection's input width (see --feedback-memory).
    #[arg(short = 'f', long = "calibration", value_name = "FILE")]
    calibration: Option<PathBuf>,
    /// Tokens per calibration chunk.
    #[arg(
        short = 'c',
        long = "ctx",
        default_value_t = 512,
        requires = "calibration"
    )]
    ctx: usize,
    /// Calibration chunks to run at most, spread over the text (8 of 512 is what COMPRESSION.md
    /// measures).
    #[arg(long, default_value_t = 8, requires = "calibration")]
    chunks: usize,
    /// Memory for the calibration moments (e.g. 4G, 500M; default: half of the available
    /// memory once the model is loaded). Where all would not fit, they are collected a few
    /// layers at a time, one pass over the calibration text per group.
    #[arg(long = "feedback-memory", value_name = "SIZE", value_parser = edgelm_server::parse_size, requires = "calibration")]
    feedback_memory: Option<u64>,
}

fn parse_file_type(s: &str) -> Result<FileType, String> {
    FileType::parse(s).ok_or_else(|| {
        let names: Vec<_> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown type {s:?}; choose one of {}", names.join(", "))
    })
}

fn parse_type(s: &str) -> Result<GgmlType, String> {
    mix::parse_tensor_type(s).ok_or_else(|| {
        let names: Vec<_> = GgmlType::ALL
            .iter()
            .filter(|t| mix::parse_tensor_type(t.name()).is_some())
            .map(|t| t.name())
            .collect();
        format!(
            "unknown tensor type {s:?}; choose one of {}",
            names.join(", ")
        )
    })
}

fn parse_tensor_type(s: &str) -> Result<(String, GgmlType), String> {
    let (re, ty) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("{s:?} is not REGEX=TYPE"))?;
    fancy_regex::Regex::new(re).map_err(|e| format!("bad pattern {re:?}: {e}"))?;
    Ok((re.to_owned(), parse_type(ty)?))
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let input = crate::resolve(&a.input)?;
    if input == a.output || a.output.canonicalize().ok() == input.canonicalize().ok() {
        bail!("the output would overwrite the input {}", input.display());
    }
    let src = GgufFile::open(&input)?;
    let imatrix = match &a.imatrix {
        Some(p) => Some(
            Imatrix::read(p)
                .with_context(|| format!("reading the importance matrix {}", p.display()))?,
        ),
        None => None,
    };
    let mut tensor_types = Vec::new();
    for (re, ty) in &a.tensor_types {
        tensor_types.push((fancy_regex::Regex::new(re)?, *ty));
    }
    let threads = a.threads.unwrap_or_else(edgelm_kernels::physical_cores);
    // Ctrl-C stops at the next chunk of rows (or of calibration text) and leaves no output.
    let interrupted = ctrl_c()?;
    let moments = match &a.calibration {
        Some(file) => {
            let model = crate::ModelArgs {
                model: input.display().to_string(),
                threads: Some(threads),
                precise: false,
                mem_limit: None,
                kv: crate::KvArgs {
                    cache_type_k: None,
                    cache_type_v: None,
                    kv_rotation: None,
                },
            };
            let (engine, _) = crate::load(&model)?;
            let tokens = calibration_tokens(&engine, file, a.ctx, a.chunks)?;
            // Half of what the system can give once the model is loaded: room beside the
            // moments for the factorizations and the output's tensors.
            let budget = match (a.feedback_memory, edgelm_models::available_memory()) {
                (Some(bytes), _) => Budget {
                    bytes,
                    source: "--feedback-memory",
                },
                (None, Some(free)) => Budget {
                    bytes: free / 2,
                    source: "half the available memory; --feedback-memory sets it",
                },
                (None, None) => Budget {
                    bytes: u64::MAX,
                    source: "unbounded where the available memory is unknown",
                },
            };
            Some(LayeredMoments::new(
                &src,
                engine,
                tokens,
                a.ctx,
                budget,
                threads,
                interrupted.clone(),
            )?)
        }
        None => None,
    };
    let opts = QuantizeOptions {
        file_type: a.file_type,
        imatrix: imatrix.as_ref(),
        imatrix_name: a
            .imatrix
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
        moments: moments
            .as_ref()
            .map(|m| m as &dyn edgelm_compress::quantize::MomentSource),
        moments_name: a
            .calibration
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
        tensor_types,
        overrides: Overrides {
            token_embedding: a.token_embedding_type,
            output: a.output_tensor_type,
            pure: a.pure,
            has_imatrix: false,
        },
        threads,
    };
    if let Some(m) = &imatrix {
        eprintln!(
            "importance matrix: {} entries from {} chunks of {} ({})",
            m.entries.len(),
            m.chunk_count,
            m.chunk_size,
            m.datasets.join(", ")
        );
    }
    let start = std::time::Instant::now();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let summary = quantize::quantize(&src, &a.output, &opts, &mut |p| {
        let t = p.tensor;
        let line = format!(
            "[{:>4}/{}] {:<36} {:>6} → {:<6} {:>6}×{:<6}",
            p.index + 1,
            p.total,
            t.name,
            t.from.name(),
            t.to.name(),
            t.cols,
            t.rows
        );
        if p.rows_done == 0 {
            let b = indicatif::ProgressBar::with_draw_target(
                Some(t.rows as u64),
                indicatif::ProgressDrawTarget::stderr(),
            );
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:24}] {percent:>3}%")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_message(line.clone());
            bar = Some(b);
        } else if let Some(b) = &bar {
            b.set_position(p.rows_done as u64);
        }
        // Reported twice at the end (last rows, then written): the line is printed once.
        if p.rows_done == t.rows {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
                eprintln!("{line}");
            }
        }
        !interrupted.load(Ordering::Relaxed)
    })?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (name, want, got) in &summary.fallbacks {
        eprintln!("fallback: {name}: rows are not whole {want} blocks, wrote {got}");
    }
    let list = |l: &[usize]| {
        l.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    for p in &summary.placements {
        eprintln!(
            "{}: {} in layers {} (the {} that lose the most as {}; by position: {})",
            p.role,
            p.to,
            list(&p.layers),
            p.layers.len(),
            p.usual,
            list(&p.by_position)
        );
    }
    if summary.mean_aware > 0 {
        eprintln!(
            "{} weight matrices rounded knowing their inputs' means (the importance matrix's input sums)",
            summary.mean_aware
        );
    }
    if summary.fed_back > 0 {
        eprintln!(
            "{} weight matrices rounded with error feedback from the calibration inputs",
            summary.fed_back
        );
    }
    if !summary.without_importance.is_empty() {
        eprintln!(
            "the importance matrix has no entry for {} weight(s), rounded without: {}",
            summary.without_importance.len(),
            summary.without_importance.join(", ")
        );
    }
    eprintln!(
        "{}: {:.2} MiB → {:.2} MiB, {:.3} bits per weight, {} in {:.1} s",
        a.output.display(),
        mib(summary.bytes_in),
        mib(summary.bytes_out),
        summary.bits_per_weight(),
        a.file_type.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct ImatrixArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Calibration text.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    ctx: usize,
    /// Chunks to run at most, spread evenly over the text (default: all it holds).
    #[arg(long)]
    chunks: Option<usize>,
    /// Output: llama.cpp's GGUF imatrix format, or its legacy format if the name ends in .dat.
    #[arg(short = 'o', long = "output", default_value = "imatrix.gguf")]
    output: PathBuf,
}

/// Sums each projection's squared inputs, as the forward pass shows them.
struct Collector(std::sync::Mutex<Imatrix>);

impl edgelm_models::Observer for Collector {
    fn linear_input(&self, weight: &str, x: &[f32], cols: usize, rows: usize) {
        if let Ok(mut m) = self.0.lock() {
            m.accumulate(weight, x, cols, rows);
        }
    }
}

pub fn imatrix(a: ImatrixArgs) -> Result<()> {
    let collector = Collector(std::sync::Mutex::new(Imatrix {
        datasets: vec![a
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()],
        chunk_size: a.ctx as u32,
        ..Default::default()
    }));
    let t0 = std::time::Instant::now();
    let (n_chunks, ppl) = calibrate(
        &a.model,
        &a.file,
        a.ctx,
        a.chunks.unwrap_or(usize::MAX),
        &collector,
        "imatrix",
    )?;
    let mut m = collector
        .0
        .into_inner()
        .map_err(|_| anyhow::anyhow!("the collector was poisoned by a panic"))?;
    m.chunk_count = n_chunks as u32;
    m.write(&a.output)?;
    eprintln!(
        "{} entries from {n_chunks} chunks in {:.1} s (perplexity {ppl:.4}) written to {}",
        m.entries.len(),
        t0.elapsed().as_secs_f64(),
        a.output.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Output GGUF path (written under a temporary name, renamed when complete).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Unstructured pruning: zero weights inside each matrix, scored by magnitude or by Wanda
    /// (|w|·‖x‖, needs --imatrix). Keeps every shape: no smaller file, no faster decoding.
    #[arg(long, value_enum, requires = "sparsity_or_pattern")]
    method: Option<MethodArg>,
    /// Fraction of each row's weights zeroed by --method, in (0, 1).
    #[arg(long, group = "sparsity_or_pattern")]
    sparsity: Option<f64>,
    /// N:M semi-structured sparsity: keep N of every M consecutive weights (e.g. 2:4).
    #[arg(long, value_name = "N:M", value_parser = parse_pattern, group = "sparsity_or_pattern")]
    pattern: Option<(usize, usize)>,
    /// Structured: keep this fraction of each layer's FFN neurons, in (0, 1] (rounded to whole
    /// blocks of ffn_down's type).
    #[arg(long = "ffn-keep", value_name = "F")]
    ffn_keep: Option<f64>,
    /// Structured: query heads each layer keeps (whole key/value groups, or the same number
    /// from every group).
    #[arg(long = "heads-keep", value_name = "H")]
    heads_keep: Option<usize>,
    /// Structured: remove blocks, listed (e.g. 3,7,12) or `auto:K` for the K that change the
    /// residual stream least on the calibration text (-f).
    #[arg(long = "drop-layers", value_name = "auto:K|LIST", value_parser = parse_drop)]
    drop_layers: Option<DropLayers>,
    /// Importance matrix (from `edgelm imatrix` or llama-imatrix) scoring neurons, heads and
    /// Wanda's inputs, and weighting the rounding of re-encoded rows.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// Calibration text for --drop-layers auto:K.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Tokens per calibration chunk.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    ctx: usize,
    /// Calibration chunks to run at most, spread evenly over the text.
    #[arg(long, default_value_t = 16)]
    chunks: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Magnitude,
    Wanda,
}

#[derive(Clone, Debug)]
enum DropLayers {
    Auto(usize),
    List(Vec<usize>),
}

fn parse_pattern(s: &str) -> Result<(usize, usize), String> {
    let (n, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not N:M (e.g. 2:4)"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?} is not N:M with whole numbers"))
    };
    Ok((num(n)?, num(m)?))
}

fn parse_drop(s: &str) -> Result<DropLayers, String> {
    if let Some(k) = s.strip_prefix("auto:") {
        let k = k
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: auto:K needs a whole number of layers"))?;
        if k == 0 {
            return Err("auto:0 drops nothing".into());
        }
        return Ok(DropLayers::Auto(k));
    }
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?} is neither auto:K nor a list of layer numbers"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(DropLayers::List)
}

fn read_imatrix(path: Option<&PathBuf>) -> Result<Option<Imatrix>> {
    path.map(|p| {
        Imatrix::read(p).with_context(|| format!("reading the importance matrix {}", p.display()))
    })
    .transpose()
}

fn refuse_overwrite(input: &std::path::Path, output: &std::path::Path) -> Result<()> {
    if input == output || output.canonicalize().ok() == input.canonicalize().ok() {
        bail!("the output would overwrite the input {}", input.display());
    }
    Ok(())
}

/// The block influence so far, and the last residual state seen (its layer and values).
type InfluenceState = (
    edgelm_compress::prune::BlockInfluence,
    Option<(usize, Vec<f32>)>,
);

/// Pairs each block's residual input with its output, as the forward pass shows them in order.
struct InfluenceCollector(std::sync::Mutex<InfluenceState>);

impl edgelm_models::Observer for InfluenceCollector {
    fn residual(&self, layer: usize, x: &[f32], cols: usize, _rows: usize) {
        if let Ok(mut g) = self.0.lock() {
            let (scores, last) = &mut *g;
            if let Some((prev, before)) = last.as_ref() {
                if *prev + 1 == layer && before.len() == x.len() {
                    scores.add(*prev, before, x, cols);
                }
            }
            *last = Some((layer, x.to_vec()));
        }
    }
}

/// Runs up to `max_chunks` chunks of `ctx` tokens of the text `file` through the model,
/// showing `observer` every step: the calibration pass of `imatrix`, `prune --drop-layers
/// auto:K` and `lowrank -f`. `what` names what is collected, for the log. Returns the chunks run
/// and the perplexity over them.
fn calibrate(
    model: &crate::ModelArgs,
    file: &std::path::Path,
    ctx: usize,
    max_chunks: usize,
    observer: &dyn edgelm_models::Observer,
    what: &str,
) -> Result<(usize, f64)> {
    let (engine, _) = crate::load(model)?;
    let tokens = calibration_tokens(&engine, file, ctx, max_chunks)?;
    let ppl = observe(&engine, &tokens, ctx, observer, what, &|| false)?;
    Ok((tokens.len() / ctx, ppl))
}

/// A flag the first Ctrl-C raises, for a run to stop at its next step and leave no output; a
/// second Ctrl-C ends the process at once (exit status 130), as it would without the flag.
fn ctrl_c() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::SIGINT;
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flag.clone())?;
    signal_hook::flag::register(SIGINT, flag.clone())?;
    Ok(flag)
}

/// Whole chunks of `ctx` tokens of the text `file`: all it holds, or `max_chunks` of them spread
/// evenly over it ([`spread_chunks`]).
fn calibration_tokens(
    engine: &edgelm_engine::Engine,
    file: &std::path::Path,
    ctx: usize,
    max_chunks: usize,
) -> Result<Vec<u32>> {
    if ctx < 4 {
        bail!("-c {ctx} is too small: a calibration chunk needs at least 4 tokens");
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let tokens = engine.tokenizer.encode(
        &text,
        edgelm_tokenizer::Encode {
            add_special: engine.tokenizer.adds_bos(),
            parse_special: false,
        },
    )?;
    let held = tokens.len() / ctx;
    if max_chunks == 0 {
        bail!("--chunks 0 runs nothing: give at least 1");
    }
    if held == 0 {
        bail!(
            "{} holds {} tokens, less than one chunk of {ctx} (-c)",
            file.display(),
            tokens.len()
        );
    }
    Ok(spread_chunks(held, max_chunks)
        .flat_map(|c| &tokens[c * ctx..(c + 1) * ctx])
        .copied()
        .collect())
}

/// Which of `held` chunks to run when at most `max` may be: all, or `max` evenly spaced from the
/// first. A text is often several documents one after another (a calibration set of source
/// files): its first chunks alone would stand for the first document only, where the spread
/// sample stands for all of them (COMPRESSION.md: Qwen's Q5_0 imatrix from the first 32 chunks
/// of the Python sources, all within argparse, against 32 spread over its 14 modules).
fn spread_chunks(held: usize, max: usize) -> impl Iterator<Item = usize> {
    let n = held.min(max);
    (0..n).map(move |i| i * held / n)
}

/// Runs `tokens` through the model in chunks of `ctx`, showing `observer` every step; returns
/// the perplexity over them. `what` names what is collected, for the log. `stop` is asked
/// between chunks: when it says so the run ends with [`Interrupted`].
fn observe(
    engine: &edgelm_engine::Engine,
    tokens: &[u32],
    ctx: usize,
    observer: &dyn edgelm_models::Observer,
    what: &str,
    stop: &dyn Fn() -> bool,
) -> Result<f64> {
    let n_chunks = tokens.len() / ctx;
    eprintln!("{what}: {n_chunks} chunks of {ctx} tokens");
    let t0 = std::time::Instant::now();
    // Every chunk scores as many tokens: the whole text's perplexity is the geometric mean.
    let mut log_ppl = 0f64;
    for (i, chunk) in tokens.chunks_exact(ctx).enumerate() {
        if stop() {
            eprintln!();
            return Err(Interrupted.into());
        }
        let r = edgelm_engine::perplexity_observed(engine, chunk, ctx, observer, &mut |_| {})?;
        log_ppl += r.ppl.ln();
        eprint!("[{}]{:.4},", i + 1, (log_ppl / (i + 1) as f64).exp());
    }
    eprintln!(" {:.1} s", t0.elapsed().as_secs_f64());
    Ok((log_ppl / n_chunks as f64).exp())
}

/// A calibration pass stopped by Ctrl-C.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Ranks the blocks by how little they turn the residual stream on the calibration text.
fn block_influence(a: &PruneArgs) -> Result<edgelm_compress::prune::BlockInfluence> {
    let file = a
        .file
        .as_ref()
        .context("--drop-layers auto:K ranks the blocks on a calibration text: give it with -f")?;
    let collector = InfluenceCollector(std::sync::Mutex::new(Default::default()));
    calibrate(
        &a.model,
        file,
        a.ctx,
        a.chunks,
        &collector,
        "ranking blocks",
    )?;
    let (scores, _) = collector
        .0
        .into_inner()
        .map_err(|_| anyhow::anyhow!("the collector was poisoned by a panic"))?;
    Ok(scores)
}

pub fn prune(a: PruneArgs) -> Result<()> {
    use edgelm_compress::prune::{self, Method, PruneOptions, Unstructured};
    let input = crate::resolve(&a.model.model)?;
    refuse_overwrite(&input, &a.output)?;
    let src = GgufFile::open(&input)?;
    let imatrix = read_imatrix(a.imatrix.as_ref())?;
    let unstructured = match (a.method, a.sparsity, a.pattern) {
        (None, None, None) => None,
        (None, _, _) => bail!("--sparsity and --pattern go with --method magnitude|wanda"),
        (Some(m), s, p) => {
            let from_pattern = p.map(|(n, m)| 1.0 - n as f64 / m.max(1) as f64);
            if let (Some(s), Some(ps)) = (s, from_pattern) {
                if (s - ps).abs() > 1e-9 {
                    bail!("--sparsity {s} disagrees with --pattern, which zeroes {ps}; give one");
                }
            }
            Some(Unstructured {
                method: match m {
                    MethodArg::Magnitude => Method::Magnitude,
                    MethodArg::Wanda => Method::Wanda,
                },
                sparsity: s.or(from_pattern).unwrap_or(0.0),
                pattern: p,
            })
        }
    };
    if unstructured.is_none()
        && a.ffn_keep.is_none()
        && a.heads_keep.is_none()
        && a.drop_layers.is_none()
    {
        bail!("nothing to prune: give --method with --sparsity or --pattern, --ffn-keep, --heads-keep or --drop-layers");
    }
    let mut opts = PruneOptions {
        imatrix: imatrix.as_ref(),
        unstructured,
        ffn_keep: a.ffn_keep,
        heads_keep: a.heads_keep,
        drop_layers: Vec::new(),
        threads: a
            .model
            .threads
            .unwrap_or_else(edgelm_kernels::physical_cores),
        description: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    };
    // Every argument is checked before the calibration pass spends minutes.
    let shape = prune::Shape::of(&src)?;
    prune::validate(&shape, &opts)?;
    opts.drop_layers = match &a.drop_layers {
        None => Vec::new(),
        Some(DropLayers::List(l)) => l.clone(),
        Some(DropLayers::Auto(k)) => {
            if *k >= shape.n_layer {
                bail!(
                    "auto:{k} would drop every one of the {} layers",
                    shape.n_layer
                );
            }
            let influence = block_influence(&a)?;
            let scores = influence.scores();
            let line: Vec<String> = scores.iter().map(|s| format!("{s:.4}")).collect();
            eprintln!("block influence (1 − cos), by layer: {}", line.join(" "));
            influence.least(*k)
        }
    };
    if !opts.drop_layers.is_empty() {
        let l: Vec<String> = opts.drop_layers.iter().map(|v| v.to_string()).collect();
        eprintln!("dropping layers {}", l.join(", "));
    }
    let interrupted = ctrl_c()?;
    let t0 = std::time::Instant::now();
    let s = prune::prune(&src, &a.output, &opts, &mut |_, _, _| {
        !interrupted.load(Ordering::Relaxed)
    })?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "layers {} → {}, FFN width {} → {}, heads {}/{} → {}/{} (query/key-value)",
        s.layers.0,
        s.layers.1,
        s.n_ff.0,
        s.n_ff.1,
        s.heads.0 .0,
        s.heads.0 .1,
        s.heads.1 .0,
        s.heads.1 .1
    );
    if s.zeroed.1 > 0 {
        eprintln!(
            "zeroed {:.1}% of the blocks' weights; unstructured sparsity brings no speed and no \
             smaller file: edgelm (like llama.cpp) has no sparse CPU kernels, so every zero is \
             still stored and multiplied. Structured pruning (--ffn-keep, --heads-keep, \
             --drop-layers) or quantizing buys speed.",
            100.0 * s.zeroed.0 as f64 / s.zeroed.1 as f64
        );
    }
    if !s.without_importance.is_empty() {
        eprintln!(
            "the importance matrix has no entry for {} weight(s), scored by magnitude: {}",
            s.without_importance.len(),
            s.without_importance.join(", ")
        );
    }
    eprintln!(
        "{}: {:.2} MiB → {:.2} MiB; weights read per token {:.2} → {:.2} MiB ({:.2}× fewer) in {:.1} s",
        a.output.display(),
        mib(s.bytes_in),
        mib(s.bytes_out),
        mib(s.read_per_token_in),
        mib(s.read_per_token_out),
        s.read_per_token_in as f64 / s.read_per_token_out.max(1) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct LowRankArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Output GGUF path (written under a temporary name, renamed when complete).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// The rank of every factored matrix.
    #[arg(long, group = "size")]
    rank: Option<usize>,
    /// Per matrix, the smallest rank keeping this fraction of its output energy (on the
    /// calibration text with -f), in (0, 1].
    #[arg(long, group = "size")]
    energy: Option<f64>,
    /// Per matrix, the rank whose two factors hold this fraction of its parameters, in (0, 1).
    #[arg(long, group = "size")]
    params: Option<f64>,
    /// Which matrices to factor (regular expression on tensor names).
    #[arg(long, default_value = edgelm_compress::lowrank::DEFAULT_TENSORS)]
    tensors: String,
    /// Calibration text: factor to minimize the error on its activations (SVD-LLM's target,
    /// from the second moments of each matrix's inputs or outputs).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Tokens per calibration chunk.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    ctx: usize,
    /// Calibration chunks to run at most, spread evenly over the text.
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    /// Importance matrix: without -f, whiten by its diagonal (inputs' mean squares).
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
}

/// Which side of a projection [`MomentCollector`] takes moments of.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// Always the inputs (error feedback in quantize).
    Inputs,
    /// The narrower side (low-rank whitening: outputs where the inputs are wider).
    Narrower,
}

/// Sums x·xᵀ of each wanted projection's inputs (or y·yᵀ of its outputs, where those are the
/// narrower side and asked for): the statistics of `Whitening::Inputs`/`Outputs` and of
/// quantize's error feedback.
struct MomentCollector {
    /// Weight name → (output side, accumulator key). q/k/v and gate/up read one input and
    /// share one accumulator.
    plan: std::collections::HashMap<String, (bool, String)>,
    sums: std::sync::Mutex<MomentSums>,
    compute: edgelm_kernels::Compute,
}

#[derive(Default)]
struct MomentSums {
    by_key: std::collections::HashMap<String, Vec<f32>>,
    /// The key and input last accumulated: a group's second member skips the same input.
    last: Option<(String, usize)>,
    /// The first error of an accumulation (the observer cannot return one).
    failure: Option<String>,
}

/// Each wanted projection's moment accumulator, in file order.
fn moment_plan(src: &GgufFile, tensors: &fancy_regex::Regex, side: Side) -> Vec<MomentEntry> {
    let mut plan = Vec::new();
    for t in src.tensors() {
        if t.dims.len() != 2 || !tensors.is_match(&t.name).unwrap_or(false) {
            continue;
        }
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let output = side == Side::Narrower && rows < cols;
        let key = if output {
            format!("{}:out", t.name)
        } else {
            let layer = edgelm_compress::mix::layer_of(&t.name);
            let role = t.name.rsplit('.').nth(1).unwrap_or("");
            match (layer, role) {
                (Some(l), "attn_q" | "attn_k" | "attn_v") => format!("{l}:attn_in"),
                (Some(l), "ffn_gate" | "ffn_up") => format!("{l}:ffn_in"),
                _ => format!("{}:in", t.name),
            }
        };
        plan.push(MomentEntry {
            weight: t.name.clone(),
            output,
            key,
            width: if output { rows } else { cols },
        });
    }
    plan
}

/// Layers as runs: "0-1, 10-17".
fn layer_runs(layers: &std::collections::BTreeSet<usize>) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &l in layers {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == l => *end = l,
            _ => runs.push((l, l)),
        }
    }
    runs.iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl MomentCollector {
    /// Collects the moments of `entries`.
    fn new<'a>(
        entries: impl Iterator<Item = &'a MomentEntry>,
        threads: usize,
    ) -> Result<MomentCollector> {
        Ok(MomentCollector {
            plan: entries
                .map(|e| (e.weight.clone(), (e.output, e.key.clone())))
                .collect(),
            sums: Default::default(),
            compute: edgelm_kernels::Compute::precise(edgelm_kernels::Isa::from_env()?, threads),
        })
    }

    fn add(&self, weight: &str, output: bool, v: &[f32], cols: usize, rows: usize) {
        let Some((want_output, key)) = self.plan.get(weight) else {
            return;
        };
        if *want_output != output {
            return;
        }
        let Ok(mut g) = self.sums.lock() else {
            return;
        };
        let id = (key.clone(), v.as_ptr() as usize);
        if g.last.as_ref() == Some(&id) {
            return;
        }
        g.last = Some(id);
        let sum = g
            .by_key
            .entry(key.clone())
            .or_insert_with(|| vec![0f32; cols * cols]);
        if sum.len() == cols * cols {
            if let Err(e) =
                edgelm_compress::lowrank::add_second_moments(&self.compute, sum, v, cols, rows)
            {
                g.failure.get_or_insert(e.to_string());
            }
        }
    }

    fn into_moments(self) -> Result<edgelm_compress::lowrank::Moments> {
        use edgelm_compress::lowrank::SecondMoments;
        let sums = self
            .sums
            .into_inner()
            .map_err(|_| anyhow::anyhow!("the collector was poisoned by a panic"))?;
        if let Some(e) = sums.failure {
            bail!("collecting the calibration inputs' moments failed: {e}");
        }
        let mut shared = std::collections::HashMap::new();
        for (key, mut sum) in sums.by_key {
            let n = (sum.len() as f64).sqrt() as usize;
            edgelm_compress::lowrank::mirror_lower(&mut sum, n);
            shared.insert(key, Arc::new(sum));
        }
        let mut out = edgelm_compress::lowrank::Moments::new();
        for (name, (output, key)) in self.plan {
            if let Some(m) = shared.get(&key) {
                let m = m.clone();
                out.insert(
                    name,
                    if output {
                        SecondMoments::Outputs(m)
                    } else {
                        SecondMoments::Inputs(m)
                    },
                );
            }
        }
        Ok(out)
    }
}

impl edgelm_models::Observer for MomentCollector {
    fn linear_input(&self, weight: &str, x: &[f32], cols: usize, rows: usize) {
        self.add(weight, false, x, cols, rows);
    }

    fn linear_output(&self, weight: &str, y: &[f32], cols: usize, rows: usize) {
        self.add(weight, true, y, cols, rows);
    }
}

/// Error feedback's input moments, a few layers at a time. The weights are cut, in the file's
/// order (the order quantizing asks for them), into passes whose moments fit the budget — one
/// pass when everything fits — each pass one run of the calibration text collecting only its
/// weights' moments. The first pass runs at once (so a bad calibration text fails before any
/// output exists); each later one when quantizing reaches its first weight, after the previous
/// pass's moments are dropped. The engine is dropped after the last pass.
struct LayeredMoments {
    plan: Vec<MomentEntry>,
    /// The pass of each entry of `plan`.
    pass_of: std::collections::HashMap<String, usize>,
    passes: usize,
    threads: usize,
    tokens: Vec<u32>,
    ctx: usize,
    /// Ctrl-C: a pass stops at its next chunk.
    interrupted: Arc<AtomicBool>,
    state: std::sync::Mutex<PassState>,
}

struct PassState {
    /// Until the last pass has run.
    engine: Option<edgelm_engine::Engine>,
    /// The pass whose moments are held, and those moments.
    held: Option<(usize, edgelm_compress::lowrank::Moments)>,
}

impl LayeredMoments {
    #[allow(clippy::too_many_arguments)]
    fn new(
        src: &GgufFile,
        engine: edgelm_engine::Engine,
        tokens: Vec<u32>,
        ctx: usize,
        budget: Budget,
        threads: usize,
        interrupted: Arc<AtomicBool>,
    ) -> Result<LayeredMoments> {
        // Every projection's inputs; the token embedding table is a lookup, not one.
        let wanted = fancy_regex::Regex::new(r"^(?!token_embd\.)")?;
        let plan = moment_plan(src, &wanted, Side::Inputs);
        let passes = plan_passes(&plan, budget.bytes);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        if passes.count > 1 || passes.largest > budget.bytes {
            eprintln!(
                "error feedback: the calibration moments need {:.0} MiB, over the {:.0} MiB \
                 budget ({}): collected in {} passes over the calibration text, the largest \
                 {:.0} MiB",
                mib(passes.total),
                mib(budget.bytes),
                budget.source,
                passes.count,
                mib(passes.largest)
            );
        }
        let pass_of = plan
            .iter()
            .zip(&passes.of_entry)
            .map(|(e, &p)| (e.weight.clone(), p))
            .collect();
        let source = LayeredMoments {
            plan,
            pass_of,
            passes: passes.count,
            threads,
            tokens,
            ctx,
            interrupted,
            state: std::sync::Mutex::new(PassState {
                engine: Some(engine),
                held: None,
            }),
        };
        {
            let mut state = source
                .state
                .lock()
                .map_err(|_| anyhow::anyhow!("the calibration state was poisoned by a panic"))?;
            source.run_pass(&mut state, 0)?;
        }
        Ok(source)
    }

    /// Runs pass `pass` over the calibration text, holding its moments in place of the last
    /// pass's (dropped first: the two never coexist).
    fn run_pass(&self, state: &mut PassState, pass: usize) -> Result<()> {
        state.held = None;
        let engine = state
            .engine
            .as_ref()
            .context("the calibration model was dropped after the last pass")?;
        let entries: Vec<&MomentEntry> = self
            .plan
            .iter()
            .filter(|e| self.pass_of.get(&e.weight) == Some(&pass))
            .collect();
        let collector = MomentCollector::new(entries.iter().copied(), self.threads)?;
        let what = match self.passes {
            1 => "collecting input moments".to_string(),
            n => {
                let layers = entries
                    .iter()
                    .filter_map(|e| edgelm_compress::mix::layer_of(&e.weight))
                    .collect();
                format!(
                    "collecting input moments, pass {} of {n} (layers {})",
                    pass + 1,
                    layer_runs(&layers)
                )
            }
        };
        let stop = || self.interrupted.load(Ordering::Relaxed);
        observe(engine, &self.tokens, self.ctx, &collector, &what, &stop)?;
        state.held = Some((pass, collector.into_moments()?));
        if pass + 1 == self.passes {
            state.engine = None;
        }
        Ok(())
    }
}

/// What bounds the moments held at once, and where that bound came from (for the log).
struct Budget {
    bytes: u64,
    source: &'static str,
}

/// One weight's moment accumulator: q/k/v and gate/up read one input and share one key.
struct MomentEntry {
    weight: String,
    /// Moments of the outputs (else of the inputs).
    output: bool,
    key: String,
    /// The moments' side: width × width values.
    width: usize,
}

/// How [`plan_passes`] cut the weights.
struct Passes {
    /// The pass of each plan entry.
    of_entry: Vec<usize>,
    count: usize,
    /// Bytes of the largest pass's moments, and of all of them.
    largest: u64,
    total: u64,
}

/// Cuts `plan` (in file order) into consecutive runs whose moments fit `budget` bytes, a run
/// never ending inside a layer unless that layer alone is over the budget (a key shared by
/// weights of two runs is collected, and counted, in both).
fn plan_passes(plan: &[MomentEntry], budget: u64) -> Passes {
    let bytes_of = |e: &MomentEntry| (e.width as u64) * (e.width as u64) * 4;
    let total: u64 = {
        let mut seen = std::collections::HashSet::new();
        plan.iter()
            .filter(|e| seen.insert(e.key.as_str()))
            .map(bytes_of)
            .sum()
    };
    // Groups of consecutive entries of one layer (or outside the blocks).
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, e) in plan.iter().enumerate() {
        let layer = edgelm_compress::mix::layer_of(&e.weight);
        match groups.last_mut() {
            Some(g) if edgelm_compress::mix::layer_of(&plan[i - 1].weight) == layer => {
                g.end = i + 1
            }
            _ => groups.push(i..i + 1),
        }
    }
    let mut of_entry = vec![0; plan.len()];
    let (mut pass, mut bytes, mut largest, mut keys) =
        (0, 0u64, 0u64, std::collections::HashSet::new());
    for range in &groups {
        let new: u64 = {
            let mut fresh = std::collections::HashSet::new();
            plan[range.clone()]
                .iter()
                .filter(|e| !keys.contains(e.key.as_str()) && fresh.insert(e.key.as_str()))
                .map(bytes_of)
                .sum()
        };
        if bytes > 0 && bytes + new > budget {
            largest = largest.max(bytes);
            pass += 1;
            bytes = 0;
            keys.clear();
        }
        for i in range.clone() {
            of_entry[i] = pass;
            if keys.insert(plan[i].key.as_str()) {
                bytes += bytes_of(&plan[i]);
            }
        }
    }
    largest = largest.max(bytes);
    Passes {
        of_entry,
        count: pass + 1,
        largest,
        total,
    }
}

impl edgelm_compress::quantize::MomentSource for LayeredMoments {
    fn input_moments(&self, tensor: &str) -> edgelm_compress::Result<Option<Arc<Vec<f32>>>> {
        let failed = |e: anyhow::Error| match e.downcast_ref::<Interrupted>() {
            Some(_) => edgelm_compress::CompressError::Interrupted,
            None => edgelm_compress::CompressError::Calibration(format!("{e:#}")),
        };
        let Some(&pass) = self.pass_of.get(tensor) else {
            return Ok(None);
        };
        let mut state = self
            .state
            .lock()
            .map_err(|_| failed(anyhow::anyhow!("a pass panicked")))?;
        if state.held.as_ref().map(|(p, _)| *p) != Some(pass) {
            self.run_pass(&mut state, pass).map_err(failed)?;
        }
        match &state.held {
            Some((_, m)) => edgelm_compress::quantize::MomentSource::input_moments(m, tensor),
            None => Ok(None),
        }
    }
}

/// Runs the calibration text through the model, collecting second moments for `tensors`.
fn collect_moments(
    a: &LowRankArgs,
    file: &std::path::Path,
    src: &GgufFile,
    tensors: &fancy_regex::Regex,
) -> Result<edgelm_compress::lowrank::Moments> {
    let threads = a
        .model
        .threads
        .unwrap_or_else(edgelm_kernels::physical_cores);
    let collector =
        MomentCollector::new(moment_plan(src, tensors, Side::Narrower).iter(), threads)?;
    calibrate(
        &a.model,
        file,
        a.ctx,
        a.chunks,
        &collector,
        "collecting activation statistics",
    )?;
    collector.into_moments()
}

pub fn lowrank(a: LowRankArgs) -> Result<()> {
    use edgelm_compress::lowrank::{self, LowRankOptions, RankChoice};
    let choice = match (a.rank, a.energy, a.params) {
        (Some(r), None, None) => RankChoice::Rank(r),
        (None, Some(e), None) if e > 0.0 && e <= 1.0 => RankChoice::Energy(e),
        (None, Some(e), None) => bail!("--energy {e} is outside (0, 1]"),
        (None, None, Some(p)) if p > 0.0 && p < 1.0 => RankChoice::Params(p),
        (None, None, Some(p)) => bail!("--params {p} is outside (0, 1)"),
        _ => bail!("give the size of the factors: --rank R, --energy E or --params F"),
    };
    let tensors = fancy_regex::Regex::new(&a.tensors)
        .with_context(|| format!("bad --tensors pattern {:?}", a.tensors))?;
    let input = crate::resolve(&a.model.model)?;
    refuse_overwrite(&input, &a.output)?;
    let src = GgufFile::open(&input)?;
    let imatrix = read_imatrix(a.imatrix.as_ref())?;
    // Arguments are checked (by a dry plan) before the calibration pass spends minutes.
    lowrank::check(&src, &tensors, choice)?;
    let moments = match &a.file {
        Some(f) => Some(collect_moments(&a, f, &src, &tensors)?),
        None => None,
    };
    let opts = LowRankOptions {
        choice,
        tensors,
        imatrix: imatrix.as_ref(),
        moments: moments.as_ref(),
        threads: a
            .model
            .threads
            .unwrap_or_else(edgelm_kernels::physical_cores),
        description: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    };
    let interrupted = ctrl_c()?;
    let t0 = std::time::Instant::now();
    let s = lowrank::lowrank(&src, &a.output, &opts, &mut |f, done, total| {
        eprintln!(
            "[{done:>4}/{total}] {:<28} {:>5}×{:<5} rank {:>4} keeps {:5.1}% of the energy ({} · {})",
            f.name,
            f.rows,
            f.cols,
            f.rank,
            100.0 * f.energy,
            f.types.0.name(),
            f.types.1.name()
        );
        !interrupted.load(Ordering::Relaxed)
    })?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "{}: {} matrices factored to {:.1}% of their parameters; {:.2} MiB → {:.2} MiB; weights \
         read per token {:.2} → {:.2} MiB ({:.2}× fewer) in {:.1} s",
        a.output.display(),
        s.factored.len(),
        100.0 * s.params.1 as f64 / s.params.0.max(1) as f64,
        mib(s.bytes_in),
        mib(s.bytes_out),
        mib(s.read_per_token_in),
        mib(s.read_per_token_out),
        s.read_per_token_in as f64 / s.read_per_token_out.max(1) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All chunks when they fit; else as many as asked, distinct, in order, from the first,
    /// spread so that no gap between picks exceeds another by more than one chunk.
    #[test]
    fn calibration_chunks_spread_over_the_text() {
        assert_eq!(spread_chunks(5, 100).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert_eq!(spread_chunks(5, 5).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert_eq!(spread_chunks(10, 4).collect::<Vec<_>>(), [0, 2, 5, 7]);
        assert_eq!(spread_chunks(1571, 1).collect::<Vec<_>>(), [0]);
        for (held, max) in [(1571, 32), (33, 32), (64, 32), (100, 7)] {
            let picked: Vec<usize> = spread_chunks(held, max).collect();
            assert_eq!(picked.len(), max);
            assert_eq!(picked[0], 0);
            assert!(
                picked[max - 1] >= held - held.div_ceil(max),
                "{held}, {max}: {picked:?}"
            );
            let gaps: Vec<usize> = picked.windows(2).map(|p| p[1] - p[0]).collect();
            let (lo, hi) = (gaps.iter().min(), gaps.iter().max());
            assert!(
                lo >= Some(&1) && hi <= lo.map(|l| l + 1).as_ref(),
                "{gaps:?}"
            );
        }
    }

    /// Entries as `moment_plan` makes them, in a file's order: (weight, key, width).
    fn plan(rows: &[(&str, &str, usize)]) -> Vec<MomentEntry> {
        rows.iter()
            .map(|(weight, key, width)| MomentEntry {
                weight: weight.to_string(),
                output: false,
                key: key.to_string(),
                width: *width,
            })
            .collect()
    }

    #[test]
    fn passes_cut_the_file_order_within_the_budget() {
        // Names sorted as text put block 10 before block 2, as some files do; block 1's weights
        // are split by block 10's, and the output head comes last.
        let rows = plan(&[
            ("blk.0.attn_q.weight", "0:attn_in", 4),
            ("blk.0.attn_k.weight", "0:attn_in", 4),
            ("blk.0.ffn_down.weight", "blk.0.ffn_down.weight:in", 8),
            ("blk.1.ffn_down.weight", "blk.1.ffn_down.weight:in", 8),
            ("blk.10.ffn_down.weight", "blk.10.ffn_down.weight:in", 8),
            ("blk.1.attn_q.weight", "1:attn_in", 4),
            ("blk.2.ffn_down.weight", "blk.2.ffn_down.weight:in", 8),
            ("output.weight", "output.weight:in", 2),
        ]);
        let bytes = |w: u64| w * w * 4;
        let total = 2 * bytes(4) + 4 * bytes(8) + bytes(2);
        // Room for everything: one pass.
        let p = plan_passes(&rows, u64::MAX);
        assert_eq!((p.count, p.largest, p.total), (1, total, total));
        assert!(p.of_entry.iter().all(|&i| i == 0));
        // Room for two of the wide inputs and a narrow one: q and k share one accumulator, so
        // block 0 is one of each; each pass is a run of the file order, and block 1, split in
        // two by block 10, is collected where each of its weights is. The head does not fit
        // beside the second pass's three.
        let p = plan_passes(&rows, 2 * bytes(8) + bytes(4));
        assert_eq!(p.of_entry, vec![0, 0, 0, 0, 1, 1, 1, 2]);
        assert_eq!(p.count, 3);
        assert_eq!(p.largest, bytes(4) + 2 * bytes(8));
        // A budget below one layer still makes progress, a run of one layer per pass.
        let p = plan_passes(&rows, 1);
        assert_eq!(p.of_entry, vec![0, 0, 0, 1, 2, 3, 4, 5]);
        assert_eq!(p.largest, bytes(4) + bytes(8));
        assert_eq!(layer_runs(&[0, 1, 2, 10, 11, 13].into()), "0-2, 10-11, 13");
    }
}
