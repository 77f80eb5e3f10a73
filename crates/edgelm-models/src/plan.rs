//! The memory planner: what a model will hold, from its metadata and the run's options alone,
//! before anything is allocated — and, when that is more than the memory allowed, what would fit.

use crate::kv::{KvCache, KvConfig, KvType, KvTypes};
use crate::{ModelError, Result, Scratch, Transformer, MAX_CHUNK};

/// Bytes a model run needs at most, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// What the process holds before the run: code, tokenizer, metadata (measured by the
    /// caller, see [`runtime_memory`]; 0 when unknown).
    pub runtime: u64,
    /// The weights: mapped from the file, or repacked on first use into a copy that replaces
    /// the mapped pages (`Linear`'s interleaved layout); every matrix is resident once used, a
    /// separate embedding table only in the rows looked up.
    pub weights: u64,
    /// Every KV block the cache may hold: the context × the sequences (windowed layers only
    /// their window).
    pub kv_cache: u64,
    /// Activations of one forward chunk, and a row of logits per sequence.
    pub scratch: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.runtime + self.weights + self.kv_cache + self.scratch
    }
}

/// The plan for `model` run with `kv` (its context, sequence count, KV type and budget) by a
/// process that holds `runtime` bytes before it starts.
pub fn memory_plan(model: &Transformer, kv: &KvConfig, runtime: u64) -> Result<MemoryPlan> {
    let chunk = MAX_CHUNK.min(kv.n_ctx.saturating_mul(kv.max_seqs));
    Ok(MemoryPlan {
        runtime,
        weights: model.resident_weight_bytes(kv.n_ctx.saturating_mul(kv.max_seqs)),
        kv_cache: KvCache::plan_bytes(&model.hp, kv)?,
        scratch: Scratch::plan_bytes(&model.hp, chunk, kv.max_seqs.min(chunk)),
    })
}

/// A run that does not fit, and what would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoesNotFit {
    pub plan: MemoryPlan,
    pub limit: u64,
    /// The longest context (a multiple of the block length) that fits with the same sequences.
    pub max_ctx: Option<usize>,
    /// The most sequences that fit at the same context.
    pub max_seqs: Option<usize>,
    /// The largest KV type smaller than the plan's (keys and values alike) with which the same
    /// context and sequences fit.
    pub smaller_kv: Option<KvType>,
}

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.plan;
        write!(
            f,
            "this run needs {} (weights {} + KV cache {} + scratch {} + runtime {}), more than \
             the {} allowed",
            mib(p.total()),
            mib(p.weights),
            mib(p.kv_cache),
            mib(p.scratch),
            mib(p.runtime),
            mib(self.limit)
        )?;
        let mut fits = Vec::new();
        if let Some(n) = self.max_ctx {
            fits.push(format!("a context of {n} tokens (--ctx {n})"));
        }
        if let Some(n) = self.max_seqs {
            fits.push(format!("{n} parallel sequences (--parallel {n})"));
        }
        match self.smaller_kv {
            Some(KvType::F16) => {
                fits.push("the fast path's f16 KV cache (drop --precise)".to_owned())
            }
            Some(t) => fits.push(format!(
                "a {t} KV cache (--cache-type-k {t} --cache-type-v {t})"
            )),
            None => {}
        }
        if fits.is_empty() {
            write!(
                f,
                "; the weights and one sequence's scratch alone do not fit: a smaller (more \
                 quantized) model is needed"
            )
        } else {
            write!(f, "; what would fit: {}", fits.join(", or "))
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// `Ok(plan)` if the run fits in `limit` bytes; otherwise what would.
pub fn check_fits(
    model: &Transformer,
    kv: &KvConfig,
    runtime: u64,
    limit: u64,
) -> Result<std::result::Result<MemoryPlan, DoesNotFit>> {
    let plan = memory_plan(model, kv, runtime)?;
    if plan.total() <= limit {
        return Ok(Ok(plan));
    }
    let fits =
        |cfg: &KvConfig| -> Result<bool> { Ok(memory_plan(model, cfg, runtime)?.total() <= limit) };
    // Longest context at the same sequence count: plans grow with the context, so bisect over
    // whole blocks.
    let b = kv.block_len;
    let (mut lo, mut hi) = (0usize, kv.n_ctx.div_ceil(b));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(&KvConfig {
            n_ctx: mid * b,
            ..kv.clone()
        })? {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let max_ctx = (lo > 0).then_some(lo * b);
    let (mut lo, mut hi) = (0usize, kv.max_seqs.saturating_sub(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(&KvConfig {
            max_seqs: mid,
            ..kv.clone()
        })? {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let max_seqs = (lo > 0).then_some(lo);
    // The largest KV type smaller than what was asked that fits, the same for keys and values.
    let asked = kv.types.k.row_bytes(32) + kv.types.v.row_bytes(32);
    let mut smaller_kv = None;
    for ty in [KvType::F16, KvType::Q8_0, KvType::Q4_0] {
        let cfg = KvConfig {
            types: KvTypes {
                k: ty,
                v: ty,
                ..kv.types
            },
            ..kv.clone()
        };
        // A type this model's heads cannot hold is no suggestion.
        if 2 * ty.row_bytes(32) < asked && matches!(fits(&cfg), Ok(true)) {
            smaller_kv = Some(ty);
            break;
        }
    }
    Ok(Err(DoesNotFit {
        plan,
        limit,
        max_ctx,
        max_seqs,
        smaller_kv,
    }))
}

/// What this process holds in memory now outside its mappings of `weight_files` (the model and
/// its repack cache, which a plan counts as `weights`), if known: a plan's `runtime`. Pages of
/// the model a first run touched while writing its repack cache stay resident but are no
/// runtime; counting them would put the weights in the plan twice.
pub fn runtime_memory(weight_files: &[std::path::PathBuf]) -> Option<u64> {
    let weight_files: Vec<std::path::PathBuf> = weight_files
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0u64;
    let mut counted = true;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first == "Rss:" {
            let kib: u64 = fields.next()?.parse().ok()?;
            if counted {
                total += kib * 1024;
            }
        } else if first.contains('-') && !first.ends_with(':') {
            counted = !mapping_path(line).is_some_and(|p| weight_files.iter().any(|w| w == p));
        }
    }
    Some(total)
}

/// The file a `/proc/self/smaps` mapping header names (range, perms, offset, device, inode,
/// then the path, which may hold spaces), if any.
fn mapping_path(header: &str) -> Option<&std::path::Path> {
    let mut rest = header;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    let path = rest.trim();
    path.starts_with('/').then(|| std::path::Path::new(path))
}

/// The most this process has held in memory (`VmHWM`), if known.
pub fn peak_resident_memory() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

fn proc_kib(file: &str, key: &str) -> Option<u64> {
    let info = std::fs::read_to_string(file).ok()?;
    let line = info.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory the system can give a new process now (`MemAvailable` of `/proc/meminfo`), if known.
pub fn available_memory() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

impl From<DoesNotFit> for ModelError {
    fn from(e: DoesNotFit) -> ModelError {
        ModelError::DoesNotFit(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_paths_are_read_from_smaps_headers() {
        let header = "7f1c-7f2c r--s 00000000 08:01 1234          /tmp/a model.gguf";
        assert_eq!(
            mapping_path(header),
            Some(std::path::Path::new("/tmp/a model.gguf"))
        );
        assert_eq!(mapping_path("7f1c-7f2c rw-p 00000000 00:00 0 "), None);
        assert_eq!(
            mapping_path("7ffd-7ffe rw-p 00000000 00:00 0   [stack]"),
            None
        );
    }

    /// The touched pages of a mapped weight file are left out of the runtime, and only they.
    #[test]
    fn runtime_leaves_out_the_weight_files_pages() {
        let dir = std::env::temp_dir().join(format!("edgelm-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.bin");
        let len = 16 << 20;
        std::fs::write(&path, vec![1u8; len]).unwrap();
        let mapped = edgelm_gguf::MappedFile::open(&path).unwrap();
        let touched: u64 = mapped.bytes().iter().step_by(4096).map(|&b| b as u64).sum();
        assert_eq!(touched, (len / 4096) as u64);
        // Other tests of this process allocate meanwhile: one of a few readings must be clean.
        let readings: Vec<i64> = (0..5)
            .map(|_| {
                let all = runtime_memory(&[]).unwrap() as i64;
                all - runtime_memory(std::slice::from_ref(&path)).unwrap() as i64
            })
            .collect();
        assert!(
            readings.iter().any(|&r| r == len as i64),
            "{readings:?} bytes left out of {len} mapped"
        );
        drop(mapped);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
