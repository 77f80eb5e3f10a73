//! How far a run's next-token distributions are from a base run's over the same text: the base
//! run writes its log-probabilities (`perplexity --kl-divergence-base`), a later run (another
//! quantization, KV type, …) reads them back and reports llama-perplexity's statistics — mean
//! KL divergence with its uncertainty, KLD percentiles, Δp of the right token, and how often both
//! agree on the top token. KLD is far less noisy than perplexity on short texts.
//!
//! File layout, little-endian: `EDGELMLP`, version (u32), chunk length (u32), vocabulary size
//! (u32), token count (u32), the tokens (u32 each); then per scored position: the row's floor
//! (f32) and step (f32), and each token's log-probability as a u16 level above the floor
//! (`lp = floor + level·step`; lower log-probabilities are stored as the floor).

use crate::{EngineError, Result};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"EDGELMLP";
const VERSION: u32 = 1;
/// Log-probabilities more than this below the row's largest (p below about 1e-13 of it) share
/// the floor: they weigh nothing in the KLD and make the levels finer.
const RANGE: f32 = 30.0;

fn io_err(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::Input(format!("{}: {e}", path.display()))
}

/// `row`'s log-softmax in f64.
fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    let shift = max + sum.ln();
    out.clear();
    out.extend(row.iter().map(|&l| l as f64 - shift));
}

/// What a base file is tied to: the same text, chunk length and vocabulary.
fn header(n_ctx: usize, n_vocab: usize, tokens: &[u32]) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    for v in [VERSION, n_ctx as u32, n_vocab as u32, tokens.len() as u32] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    tokens
        .iter()
        .for_each(|t| h.extend_from_slice(&t.to_le_bytes()));
    h
}

/// Writes a base run's log-probabilities under a temporary name, renamed to the final one only
/// when [`BaseWriter::finish`] is called: an interrupted run leaves no base file.
pub struct BaseWriter {
    out: BufWriter<std::fs::File>,
    partial: PathBuf,
    path: PathBuf,
    lp: Vec<f64>,
    levels: Vec<u8>,
}

impl BaseWriter {
    pub fn create(path: &Path, n_ctx: usize, n_vocab: usize, tokens: &[u32]) -> Result<Self> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = std::fs::File::create(&partial).map_err(|e| io_err(&partial, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header(n_ctx, n_vocab, tokens))
            .map_err(|e| io_err(&partial, e))?;
        Ok(BaseWriter {
            out,
            partial,
            path: path.to_owned(),
            lp: Vec::new(),
            levels: Vec::new(),
        })
    }

    /// Stores one scored position's logits as log-probabilities.
    pub fn row(&mut self, logits: &[f32]) -> Result<()> {
        log_softmax(logits, &mut self.lp);
        let top = self.lp.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
        let floor = top - RANGE;
        let step = RANGE / 65535.0;
        self.levels.clear();
        self.levels.extend_from_slice(&floor.to_le_bytes());
        self.levels.extend_from_slice(&step.to_le_bytes());
        for &lp in &self.lp {
            let level = ((lp as f32 - floor) / step).round().clamp(0.0, 65535.0) as u16;
            self.levels.extend_from_slice(&level.to_le_bytes());
        }
        self.out
            .write_all(&self.levels)
            .map_err(|e| io_err(&self.partial, e))
    }

    /// Flushes and gives the file its final name.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush().map_err(|e| io_err(&self.partial, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| io_err(&self.partial, e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| io_err(&self.path, e))
    }
}

impl Drop for BaseWriter {
    fn drop(&mut self) {
        // Unfinished: take the partial file away (after a rename there is nothing to remove).
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// Reads a base file row by row, after checking it was made over the same text.
pub struct BaseReader {
    input: BufReader<std::fs::File>,
    path: PathBuf,
    n_vocab: usize,
    raw: Vec<u8>,
}

impl BaseReader {
    pub fn open(path: &Path, n_ctx: usize, n_vocab: usize, tokens: &[u32]) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        let mut input = BufReader::with_capacity(1 << 20, file);
        let want = header(n_ctx, n_vocab, tokens);
        let mut got = vec![0u8; want.len()];
        let read = input.read_exact(&mut got);
        let bad = |what: &str| {
            EngineError::Input(format!(
                "{} {what}; write it again with --kl-divergence-base over the same file and -c",
                path.display()
            ))
        };
        if read.is_err() || got[..8] != want[..8] {
            return Err(bad(
                "is not an edgelm base log-probability file (or is cut short)",
            ));
        }
        if got[8..12] != want[8..12] {
            return Err(bad("is of another format version"));
        }
        if got[12..20] != want[12..20] {
            return Err(bad(
                "was made with another chunk length or vocabulary (another model family)",
            ));
        }
        if got[20..] != want[20..] {
            return Err(bad("was made over another text"));
        }
        Ok(BaseReader {
            input,
            path: path.to_owned(),
            n_vocab,
            raw: Vec::new(),
        })
    }

    /// The next scored position's base log-probabilities.
    pub fn next_row(&mut self, out: &mut Vec<f64>) -> Result<()> {
        self.raw.resize(8 + 2 * self.n_vocab, 0);
        self.input.read_exact(&mut self.raw).map_err(|_| {
            EngineError::Input(format!(
                "{} ends before the text does; write it again with --kl-divergence-base",
                self.path.display()
            ))
        })?;
        let f = |i: usize| {
            f32::from_le_bytes([
                self.raw[i],
                self.raw[i + 1],
                self.raw[i + 2],
                self.raw[i + 3],
            ])
        };
        let (floor, step) = (f(0) as f64, f(4) as f64);
        out.clear();
        out.extend(
            self.raw[8..]
                .chunks_exact(2)
                .map(|c| floor + u16::from_le_bytes([c[0], c[1]]) as f64 * step),
        );
        // Normalized again: the levels' rounding would otherwise bias every KLD by its first
        // order (a run against its own base then reads about 1e-5, not about 1e-8).
        let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let norm = max + out.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        out.iter_mut().for_each(|l| *l -= norm);
        Ok(())
    }

    /// Fails if rows remain: the base run scored more than this one.
    pub fn finish(mut self) -> Result<()> {
        let mut byte = [0u8; 1];
        match self.input.read(&mut byte) {
            Ok(0) => Ok(()),
            _ => Err(EngineError::Input(format!(
                "{} holds more positions than this run scored; was it made with another -c?",
                self.path.display()
            ))),
        }
    }
}

/// Per-position comparisons of a run against its base.
#[derive(Default)]
pub struct KlStats {
    kld: Vec<f64>,
    /// p(right token) − base p(right token).
    dp: Vec<f64>,
    /// −log p(right token), this run and the base.
    nll: Vec<(f64, f64)>,
    same_top: usize,
    lp: Vec<f64>,
}

impl KlStats {
    /// One scored position: base log-probabilities, this run's logits, the right next token.
    pub fn add(&mut self, base: &[f64], logits: &[f32], next: u32) {
        log_softmax(logits, &mut self.lp);
        let lp = &self.lp;
        let kld: f64 = base
            .iter()
            .zip(lp)
            .map(|(&b, &q)| b.exp() * (b - q))
            .sum::<f64>()
            .max(0.0);
        let argmax = |x: &[f64]| {
            x.iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |a, (i, &v)| if v > a.1 { (i, v) } else { a },
                )
                .0
        };
        self.same_top += (argmax(base) == argmax(lp)) as usize;
        let n = next as usize;
        self.kld.push(kld);
        self.dp.push(lp[n].exp() - base[n].exp());
        self.nll.push((-lp[n], -base[n]));
    }

    pub fn summary(&self) -> Option<KlSummary> {
        let n = self.kld.len();
        if n < 2 {
            return None;
        }
        let (kld_mean, kld_err) = mean_err(&self.kld);
        let (dp_mean, dp_err) = mean_err(&self.dp);
        let ln_ratio: Vec<f64> = self.nll.iter().map(|(q, b)| q - b).collect();
        let (ln_ratio_mean, ln_ratio_err) = mean_err(&ln_ratio);
        let nll_q: f64 = self.nll.iter().map(|x| x.0).sum::<f64>() / n as f64;
        let nll_b: f64 = self.nll.iter().map(|x| x.1).sum::<f64>() / n as f64;
        let p = self.same_top as f64 / n as f64;
        Some(KlSummary {
            n,
            ppl: nll_q.exp(),
            ppl_base: nll_b.exp(),
            ln_ratio_mean,
            ln_ratio_err,
            kld_mean,
            kld_err,
            kld: Percentiles::of(&self.kld),
            dp_mean,
            dp_err,
            dp_rms: (self.dp.iter().map(|d| d * d).sum::<f64>() / n as f64).sqrt(),
            dp: Percentiles::of(&self.dp),
            same_top: p,
            same_top_err: (p * (1.0 - p) / (n - 1) as f64).sqrt(),
        })
    }
}

fn mean_err(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The quantiles llama-perplexity prints.
#[derive(Debug, Clone)]
pub struct Percentiles {
    pub max: f64,
    pub p99_9: f64,
    pub p99: f64,
    pub p95: f64,
    pub p90: f64,
    pub median: f64,
    pub p10: f64,
    pub p5: f64,
    pub p1: f64,
    pub p0_1: f64,
    pub min: f64,
}

impl Percentiles {
    fn of(x: &[f64]) -> Percentiles {
        let mut s = x.to_vec();
        s.sort_by(f64::total_cmp);
        // Linear interpolation between the closest ranks.
        let q = |p: f64| {
            let at = p * (s.len() - 1) as f64;
            let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (at - lo as f64)
        };
        Percentiles {
            max: s[s.len() - 1],
            p99_9: q(0.999),
            p99: q(0.99),
            p95: q(0.95),
            p90: q(0.90),
            median: q(0.5),
            p10: q(0.10),
            p5: q(0.05),
            p1: q(0.01),
            p0_1: q(0.001),
            min: s[0],
        }
    }

    fn rows(&self) -> [(&'static str, f64); 11] {
        [
            ("Maximum", self.max),
            ("99.9%  ", self.p99_9),
            ("99.0%  ", self.p99),
            ("95.0%  ", self.p95),
            ("90.0%  ", self.p90),
            ("Median ", self.median),
            ("10.0%  ", self.p10),
            (" 5.0%  ", self.p5),
            (" 1.0%  ", self.p1),
            (" 0.1%  ", self.p0_1),
            ("Minimum", self.min),
        ]
    }
}

/// llama-perplexity's KL-divergence report.
#[derive(Debug, Clone)]
pub struct KlSummary {
    /// Positions compared.
    pub n: usize,
    pub ppl: f64,
    pub ppl_base: f64,
    pub ln_ratio_mean: f64,
    pub ln_ratio_err: f64,
    pub kld_mean: f64,
    pub kld_err: f64,
    pub kld: Percentiles,
    pub dp_mean: f64,
    pub dp_err: f64,
    pub dp_rms: f64,
    pub dp: Percentiles,
    /// Fraction of positions where both put the same token on top.
    pub same_top: f64,
    pub same_top_err: f64,
}

impl std::fmt::Display for KlSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "====== Perplexity statistics ({} positions) ======",
            self.n
        )?;
        writeln!(f, "Mean PPL(Q)                   : {:10.6}", self.ppl)?;
        writeln!(f, "Mean PPL(base)                : {:10.6}", self.ppl_base)?;
        writeln!(
            f,
            "Mean ln(PPL(Q)/PPL(base))     : {:10.6} ± {:10.6}",
            self.ln_ratio_mean, self.ln_ratio_err
        )?;
        writeln!(
            f,
            "Mean PPL(Q)/PPL(base)         : {:10.6}",
            self.ln_ratio_mean.exp()
        )?;
        writeln!(f, "\n====== KL divergence statistics ======")?;
        // llama.cpp's six decimals round a near-lossless file (f32 activations, a requantized
        // shipped type) to 0.000001; three more keep such files apart.
        let digits = if self.kld_mean < 1e-3 { 9 } else { 6 };
        writeln!(
            f,
            "Mean    KLD: {:10.digits$} ± {:10.digits$}",
            self.kld_mean, self.kld_err
        )?;
        for (name, v) in self.kld.rows() {
            writeln!(f, "{name} KLD: {v:10.digits$}")?;
        }
        writeln!(f, "\n====== Token probability statistics ======")?;
        writeln!(
            f,
            "Mean    Δp: {:8.3} ± {:5.3} %",
            100.0 * self.dp_mean,
            100.0 * self.dp_err
        )?;
        for (name, v) in self.dp.rows() {
            writeln!(f, "{name} Δp: {:8.3}%", 100.0 * v)?;
        }
        writeln!(f, "RMS Δp    : {:8.3} %", 100.0 * self.dp_rms)?;
        write!(
            f,
            "Same top p: {:7.3} ± {:5.3} %",
            100.0 * self.same_top,
            100.0 * self.same_top_err
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(seed: u64, n: usize, vocab: usize) -> Vec<Vec<f32>> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                (0..vocab)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        (s >> 40) as f32 / (1u64 << 24) as f32 * 8.0
                    })
                    .collect()
            })
            .collect()
    }

    fn compare(path: &Path, tokens: &[u32], run: &[Vec<f32>]) -> Result<KlSummary> {
        let mut r = BaseReader::open(path, 8, 50, tokens)?;
        let (mut stats, mut base) = (KlStats::default(), Vec::new());
        for (i, row) in run.iter().enumerate() {
            r.next_row(&mut base)?;
            stats.add(&base, row, tokens[i]);
        }
        r.finish()?;
        Ok(stats.summary().expect("rows"))
    }

    #[test]
    fn a_run_against_its_own_base_diverges_by_nothing_and_others_by_more() {
        let dir = std::env::temp_dir().join(format!("edgelm-kld-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.lp");
        let tokens: Vec<u32> = (0..20).map(|i| i * 2).collect();
        let base = rows(1, 20, 50);
        let mut w = BaseWriter::create(&path, 8, 50, &tokens).unwrap();
        for row in &base {
            w.row(row).unwrap();
        }
        assert!(!path.exists(), "the final name appears only when finished");
        w.finish().unwrap();

        let same = compare(&path, &tokens, &base).unwrap();
        assert!(same.kld_mean < 1e-7, "{same}");
        assert_eq!(same.same_top, 1.0);
        assert!((same.ppl / same.ppl_base - 1.0).abs() < 1e-4, "{same}");
        // The base's logits plus noise of amplitude `scale`.
        let perturbed = |seed: u64, scale: f32| -> Vec<Vec<f32>> {
            base.iter()
                .zip(rows(seed, 20, 50))
                .map(|(b, n)| b.iter().zip(n).map(|(b, n)| b + scale * n).collect())
                .collect()
        };
        // Noise on the logits: a positive divergence, and the text report names it.
        let other = compare(&path, &tokens, &perturbed(2, 0.1)).unwrap();
        assert!(
            other.kld_mean > 1e-3 && other.kld_mean > 10.0 * same.kld_mean,
            "{other}"
        );
        assert!(other.to_string().contains("Mean    KLD:"));
        // A near-lossless run keeps its mean's significant digits in the report.
        let close = compare(&path, &tokens, &perturbed(3, 0.001)).unwrap();
        let text = close.to_string();
        let printed: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Mean    KLD:"))
            .and_then(|l| l.split('±').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        assert!(close.kld_mean > 1e-7 && close.kld_mean < 1e-4, "{text}");
        assert!((printed / close.kld_mean - 1.0).abs() < 0.01, "{text}");

        // Another text, a run that scores fewer or more positions: refused by name.
        let e = BaseReader::open(&path, 8, 50, &tokens[1..]).err().unwrap();
        assert!(e.to_string().contains("another text"), "{e}");
        let e = BaseReader::open(&path, 16, 50, &tokens).err().unwrap();
        assert!(e.to_string().contains("chunk length"), "{e}");
        let e = compare(&path, &tokens, &base[..19]).unwrap_err();
        assert!(e.to_string().contains("more positions"), "{e}");
        let mut longer = base.clone();
        longer.push(base[0].clone());
        let e = compare(&path, &[tokens.clone(), vec![0]].concat(), &longer).unwrap_err();
        assert!(e.to_string().contains("another text"), "{e}");

        // An unfinished writer leaves nothing behind.
        let dropped = dir.join("dropped.lp");
        let mut w = BaseWriter::create(&dropped, 8, 50, &tokens).unwrap();
        w.row(&base[0]).unwrap();
        drop(w);
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 1,
            "a partial file stayed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
