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
    let opts = QuantizeOptions {
        file_type: a.file_type,
        imatrix: imatrix.as_ref(),
        imatrix_name: a
            .imatrix
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
        threads: a.threads.unwrap_or_else(edgelm_kernels::physical_cores),
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
    // Ctrl-C stops at the next chunk of rows and leaves no output behind.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
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
        if p.rows_done == t.rows {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("{line}");
        }
        !interrupted.load(Ordering::Relaxed)
    })?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (name, want, got) in &summary.fallbacks {
        eprintln!("fallback: {name}: rows are not whole {want} blocks, wrote {got}");
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
    /// Chunks to run at most (default: all the text holds).
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
    let (engine, _) = crate::load(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let tokens = engine.tokenizer.encode(
        &text,
        edgelm_tokenizer::Encode {
            add_special: engine.tokenizer.adds_bos(),
            parse_special: false,
        },
    )?;
    let available = tokens.len() / a.ctx.max(1);
    let n_chunks = a.chunks.map_or(available, |c| c.min(available));
    if n_chunks == 0 {
        bail!(
            "{} holds {} tokens, less than one chunk of {} (-c)",
            a.file.display(),
            tokens.len(),
            a.ctx
        );
    }
    eprintln!(
        "imatrix: {} tokens, {n_chunks} chunks of {}",
        tokens.len(),
        a.ctx
    );
    let collector = Collector(std::sync::Mutex::new(Imatrix {
        datasets: vec![a
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()],
        chunk_count: n_chunks as u32,
        chunk_size: a.ctx as u32,
        ..Default::default()
    }));
    let t0 = std::time::Instant::now();
    let r = edgelm_engine::perplexity_observed(
        &engine,
        &tokens[..n_chunks * a.ctx],
        a.ctx,
        &collector,
        &mut |c| eprint!("[{}]{:.4},", c.index + 1, c.ppl),
    )?;
    let m = collector
        .0
        .into_inner()
        .map_err(|_| anyhow::anyhow!("the collector was poisoned by a panic"))?;
    m.write(&a.output)?;
    eprintln!(
        "\n{} entries from {n_chunks} chunks in {:.1} s (perplexity {:.4}) written to {}",
        m.entries.len(),
        t0.elapsed().as_secs_f64(),
        r.ppl,
        a.output.display()
    );
    Ok(())
}
