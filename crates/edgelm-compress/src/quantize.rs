//! Whole-file quantization: every weight matrix of a GGUF model dequantized and requantized to
//! the type the mix rules (or the user's patterns) give it, rounding searched by weighted least
//! squares with the importance matrix when given, each block's error carried into the columns
//! not yet rounded when the calibration inputs' second moments are given ([`crate::gptq`]);
//! everything else copied. The output is written under a temporary name and renamed only when
//! complete.

use crate::gptq::{Compensator, MeanFeedback};
use crate::imatrix::Imatrix;
use crate::lowrank::{Moments, SecondMoments};
use crate::mix::{self, FileType, ModelShape, Overrides};
use crate::{CompressError, Result};
use edgelm_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use std::path::Path;
use std::sync::Arc;

pub struct QuantizeOptions<'a> {
    pub file_type: FileType,
    pub imatrix: Option<&'a Imatrix>,
    /// Label recorded in the output's metadata (`quantize.imatrix.file`).
    pub imatrix_name: Option<String>,
    /// Σ x·xᵀ of each projection's inputs on calibration text: rounding errors are fed back
    /// ([`crate::gptq`]) in every matrix with an entry but the token embedding table.
    pub moments: Option<&'a dyn MomentSource>,
    /// Label recorded in the output's metadata (`quantize.feedback.dataset`).
    pub moments_name: Option<String>,
    /// `--tensor-type REGEX=TYPE`, first match wins; replaces the mix rules for that tensor.
    pub tensor_types: Vec<(fancy_regex::Regex, GgmlType)>,
    pub overrides: Overrides,
    pub threads: usize,
}

/// Where error feedback finds a weight matrix's input moments (Σ x·xᵀ over calibration text),
/// asked for in the file's tensor order as each matrix is reached, so a source may collect them
/// a few layers at a time rather than hold every layer's at once.
pub trait MomentSource: Sync {
    fn input_moments(&self, tensor: &str) -> Result<Option<Arc<Vec<f32>>>>;
}

/// Moments collected beforehand, all at once.
impl MomentSource for Moments {
    fn input_moments(&self, tensor: &str) -> Result<Option<Arc<Vec<f32>>>> {
        Ok(match self.get(tensor) {
            Some(SecondMoments::Inputs(h)) => Some(h.clone()),
            _ => None,
        })
    }
}

/// One tensor's decision.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub from: GgmlType,
    pub to: GgmlType,
    pub rows: usize,
    pub cols: usize,
    /// Whether it is converted (a weight matrix) or copied as it is.
    pub convert: bool,
}

/// Progress of the tensor at `index` of `total`: `rows_done` of its rows are written.
pub struct Progress<'a> {
    pub index: usize,
    pub total: usize,
    pub tensor: &'a TensorPlan,
    pub rows_done: usize,
}

#[derive(Debug)]
pub struct Summary {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub params: u64,
    /// Tensors whose type fell back from the rule's because their rows are not whole blocks.
    pub fallbacks: Vec<(String, GgmlType, GgmlType)>,
    /// Weight matrices the importance matrix had no entry for.
    pub without_importance: Vec<String>,
    /// Weight matrices rounded with error feedback.
    pub fed_back: usize,
    /// Weight matrices rounded knowing their inputs' means (the importance matrix's input sums).
    pub mean_aware: usize,
    /// Where the mix's extra bits went.
    pub placements: Vec<Placement>,
}

impl Summary {
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes_out as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// The facts the mix rules need, from the model's metadata.
pub fn model_shape(f: &GgufFile) -> ModelShape {
    let arch = f.get_str("general.architecture").unwrap_or("");
    let key = |k: &str| f.get_u64(&format!("{arch}.{k}"));
    let heads = key("attention.head_count").unwrap_or(1).max(1);
    let kv = key("attention.head_count_kv").unwrap_or(heads).max(1);
    let n_layer = key("block_count").unwrap_or_else(|| {
        f.tensors()
            .iter()
            .filter_map(|t| mix::layer_of(&t.name))
            .max()
            .map_or(0, |l| l as u64 + 1)
    });
    ModelShape {
        n_layer: n_layer as usize,
        n_gqa: (heads / kv) as usize,
        tied_embeddings: f.tensor_info("output.weight").is_none(),
    }
}

/// Every tensor's decision, and where measured loss placed a mix's extra bits.
#[derive(Debug)]
pub struct Plan {
    /// Each tensor with the rule's choice before the row-length fallback, in the file's order.
    pub tensors: Vec<(TensorPlan, GgmlType)>,
    pub placements: Vec<Placement>,
}

/// The layers of one role given a mix's higher type: as many as llama.cpp's positional rule
/// (the ends and every third layer) gives it, chosen as those that lose the most rounding to
/// the usual type rather than by position. The file's size is the same either way, and a
/// source that was itself quantized keeps its higher-precision layers: llama.cpp picks them
/// by the order tensors come in the file, so files it wrote from the same model differ.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The tensors' name after `blk.N.`, e.g. `ffn_down.weight`.
    pub role: String,
    pub to: GgmlType,
    pub usual: GgmlType,
    pub layers: Vec<usize>,
    pub by_position: Vec<usize>,
}

/// Rows measured per tensor to rank [`Placement`]s: evenly spaced, enough for a ranking.
const LOSS_SAMPLE_ROWS: usize = 256;

/// Every tensor's type under `opts` (see [`Plan`]).
pub fn plan(f: &GgufFile, opts: &QuantizeOptions) -> Result<Plan> {
    let shape = model_shape(f);
    let overrides = Overrides {
        has_imatrix: opts.imatrix.is_some(),
        ..opts.overrides
    };
    let mut out = Vec::new();
    // Tensors typed by the mix rules rather than a user's pattern.
    let mut by_rule = Vec::new();
    for t in f.tensors() {
        let cols = t.dims.first().copied().unwrap_or(1) as usize;
        let n: u64 = t.dims.iter().product();
        let rows = if cols == 0 {
            0
        } else {
            (n / cols as u64) as usize
        };
        let convert = mix::is_quantizable(&t.name, t.dims.len());
        let mut chosen = t.ty;
        let mut typed_by_rule = false;
        if convert {
            if !edgelm_quant::can_dequantize(t.ty) {
                return Err(CompressError::Unsupported(format!(
                    "tensor {} is {}, which edgelm cannot read",
                    t.name, t.ty
                )));
            }
            let manual = opts
                .tensor_types
                .iter()
                .find(|(re, _)| re.is_match(&t.name).unwrap_or(false))
                .map(|(_, ty)| *ty);
            typed_by_rule = manual.is_none();
            chosen = match manual {
                Some(ty) => ty,
                None => mix::rule_type(opts.file_type, &t.name, cols, &shape, &overrides),
            };
        }
        by_rule.push(typed_by_rule);
        let to = if convert {
            mix::fit_rows(chosen, cols)
        } else {
            t.ty
        };
        out.push((
            TensorPlan {
                name: t.name.clone(),
                from: t.ty,
                to,
                rows,
                cols,
                convert,
            },
            chosen,
        ));
    }
    let mut placements = Vec::new();
    if !overrides.pure {
        for role in [mix::Role::AttnV, mix::Role::FfnDown] {
            if let Some((high, usual)) = mix::extra_bits_by_layer(opts.file_type, role) {
                let members: Vec<usize> = (0..out.len())
                    .filter(|&i| by_rule[i] && mix::Role::of(&out[i].0.name) == role)
                    .collect();
                placements.extend(place_extra_bits(f, opts, &mut out, &members, high, usual)?);
            }
        }
    }
    Ok(Plan {
        tensors: out,
        placements,
    })
}

/// Re-chooses which of `members` (one role's tensors, one per layer) get `high` rather than
/// `usual`: the same number as the rules gave it, those whose rounding loss falls the most.
/// Left as the rules put them when the tensors differ in shape (sizes would change) or both
/// types come out the same after the row-length fallback.
fn place_extra_bits(
    f: &GgufFile,
    opts: &QuantizeOptions,
    planned: &mut [(TensorPlan, GgmlType)],
    members: &[usize],
    high: GgmlType,
    usual: GgmlType,
) -> Result<Option<Placement>> {
    let Some(&first) = members.first() else {
        return Ok(None);
    };
    let (rows, cols) = (planned[first].0.rows, planned[first].0.cols);
    let (high_fit, usual_fit) = (mix::fit_rows(high, cols), mix::fit_rows(usual, cols));
    let upgraded = members.iter().filter(|&&i| planned[i].1 == high).count();
    let uniform = members.iter().all(|&i| {
        let (t, chosen) = &planned[i];
        (t.rows, t.cols) == (rows, cols) && (*chosen == high || *chosen == usual)
    });
    if !uniform || high_fit == usual_fit || upgraded == 0 || upgraded == members.len() {
        return Ok(None);
    }
    let mut ranked = Vec::with_capacity(members.len());
    for &i in members {
        let t = &planned[i].0;
        let importance = opts.imatrix.and_then(|m| m.importance(&t.name));
        let importance = importance.as_deref().filter(|v| v.len() == t.cols);
        let gain = rounding_loss(f, t, usual_fit, importance, opts.threads)?
            - rounding_loss(f, t, high_fit, importance, opts.threads)?;
        // Ties keep the rules' choice.
        let layer = mix::layer_of(&t.name).unwrap_or(0);
        ranked.push((gain, planned[i].1 == high, i, layer));
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut by_position: Vec<usize> = ranked.iter().filter(|r| r.1).map(|r| r.3).collect();
    let mut layers = Vec::with_capacity(upgraded);
    for (rank, &(_, _, i, layer)) in ranked.iter().enumerate() {
        let (t, chosen) = &mut planned[i];
        *chosen = if rank < upgraded { high } else { usual };
        t.to = mix::fit_rows(*chosen, t.cols);
        if rank < upgraded {
            layers.push(layer);
        }
    }
    layers.sort_unstable();
    by_position.sort_unstable();
    let name = &planned[first].0.name;
    let role = name.splitn(3, '.').nth(2).unwrap_or(name).to_string();
    Ok(Some(Placement {
        role,
        to: high_fit,
        usual: usual_fit,
        layers,
        by_position,
    }))
}

/// What rounding `t` to `ty` loses, relative: Σ importance·error² over Σ importance·weight² on
/// up to [`LOSS_SAMPLE_ROWS`] evenly spaced rows (importance 1 without an imatrix).
fn rounding_loss(
    f: &GgufFile,
    t: &TensorPlan,
    ty: GgmlType,
    importance: Option<&[f32]>,
    threads: usize,
) -> Result<f64> {
    let view = f
        .tensor(&t.name)
        .ok_or_else(|| CompressError::Unsupported(format!("tensor {} has no data", t.name)))?;
    let in_row = edgelm_quant::row_bytes(t.from, t.cols)?;
    let out_row = edgelm_quant::row_bytes(ty, t.cols)?;
    let n = t.rows.min(LOSS_SAMPLE_ROWS);
    let sampled: Vec<usize> = (0..n).map(|k| k * t.rows / n.max(1)).collect();
    let per_thread = n.div_ceil(threads.max(1)).max(1);
    let sums = std::thread::scope(|s| {
        let handles: Vec<_> = sampled
            .chunks(per_thread)
            .map(|rows| {
                s.spawn(move || -> Result<(f64, f64)> {
                    let (mut row, mut back) = (vec![0f32; t.cols], vec![0f32; t.cols]);
                    let mut q = vec![0u8; out_row];
                    let (mut err, mut energy) = (0f64, 0f64);
                    for &r in rows {
                        let src = &view.data[r * in_row..(r + 1) * in_row];
                        edgelm_quant::dequantize_row(t.from, src, &mut row)?;
                        crate::rows::check_finite(&t.name, &row)?;
                        edgelm_quant::quantize_row_weighted(ty, &row, importance, &mut q)?;
                        edgelm_quant::dequantize_row(ty, &q, &mut back)?;
                        for (j, (&w, &b)) in row.iter().zip(&back).enumerate() {
                            let imp = importance.map_or(1.0, |v| v[j] as f64);
                            err += imp * (w - b) as f64 * (w - b) as f64;
                            energy += imp * w as f64 * w as f64;
                        }
                    }
                    Ok((err, energy))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(CompressError::Panicked)))
            .collect::<Result<Vec<_>>>()
    })?;
    let (err, energy) = sums
        .iter()
        .fold((0.0, 0.0), |(e, w), &(a, b)| (e + a, w + b));
    Ok(if energy > 0.0 { err / energy } else { 0.0 })
}

/// Quantizes `src` into `out`; `progress` is called as each tensor starts and as its rows
/// are written, and stops the run by returning false. Nothing exists under `out` unless the
/// whole file was written.
pub fn quantize(
    src: &GgufFile,
    out: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<Summary> {
    let Plan {
        tensors: planned,
        placements,
    } = plan(src, opts)?;
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        w.set(k, v.clone());
    }
    w.set("general.file_type", Value::U32(opts.file_type.id()));
    w.set("general.quantization_version", Value::U32(2));
    if let Some(m) = opts.imatrix {
        if let Some(name) = &opts.imatrix_name {
            w.set("quantize.imatrix.file", Value::String(name.clone()));
        }
        if let Some(d) = m.datasets.first() {
            w.set("quantize.imatrix.dataset", Value::String(d.clone()));
        }
        w.set(
            "quantize.imatrix.entries_count",
            Value::I32(m.entries.len() as i32),
        );
        w.set(
            "quantize.imatrix.chunks_count",
            Value::I32(m.chunk_count as i32),
        );
    }
    if let Some(name) = &opts.moments_name {
        w.set("quantize.feedback.dataset", Value::String(name.clone()));
    }
    let mut summary = Summary {
        bytes_in: 0,
        bytes_out: 0,
        params: 0,
        fallbacks: Vec::new(),
        without_importance: Vec::new(),
        fed_back: 0,
        mean_aware: 0,
        placements,
    };
    // Feedback's products run on the f32 kernels, on the ISA the moments were collected with
    // (EDGELM_ISA if set).
    let compute = if opts.moments.is_some() {
        let isa = edgelm_kernels::Isa::from_env()
            .map_err(|e| CompressError::BadArgument(e.to_string()))?;
        Some(edgelm_kernels::Compute::precise(isa, opts.threads))
    } else {
        None
    };
    // The tensor table first, each size following from the planned type; then each tensor's
    // bytes as they are made, so the output is never held in memory whole.
    let mut table = Vec::with_capacity(planned.len());
    for (t, _) in &planned {
        let info = src
            .tensor_info(&t.name)
            .ok_or_else(|| CompressError::Unsupported(format!("tensor {} has no data", t.name)))?;
        table.push(edgelm_gguf::TensorHeader {
            name: t.name.clone(),
            dims: info.dims.clone(),
            ty: t.to,
        });
    }
    crate::write_atomically(out, |f| {
        let mut stream = w.stream_to(&table, f)?;
        // q/k/v (and gate/up) share one input's moments, so one factorization.
        let mut last: Option<(Arc<Vec<f32>>, Arc<Compensator>)> = None;
        let total = planned.len();
        for (index, (t, chosen)) in planned.iter().enumerate() {
            let data = quantize_tensor(
                src,
                opts,
                t,
                *chosen,
                index,
                total,
                compute.as_ref(),
                &mut last,
                &mut summary,
                progress,
            )?;
            summary.bytes_out += data.len() as u64;
            summary.params += (t.rows * t.cols) as u64;
            stream
                .put(&t.name, &data)
                .map_err(|e| CompressError::io(out, e))?;
            if !progress(&Progress {
                index,
                total,
                tensor: t,
                rows_done: t.rows,
            }) {
                return Err(CompressError::Interrupted);
            }
        }
        stream.finish().map_err(|e| CompressError::io(out, e))?;
        Ok(())
    })?;
    Ok(summary)
}

/// One tensor's bytes in the output: copied, or converted to its planned type (with error
/// feedback where the calibration moments have an entry).
#[allow(clippy::too_many_arguments)]
fn quantize_tensor<'a>(
    src: &'a GgufFile,
    opts: &QuantizeOptions,
    t: &TensorPlan,
    chosen: GgmlType,
    index: usize,
    total: usize,
    compute: Option<&edgelm_kernels::Compute>,
    last: &mut Option<(Arc<Vec<f32>>, Arc<Compensator>)>,
    summary: &mut Summary,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let view = src
        .tensor(&t.name)
        .ok_or_else(|| CompressError::Unsupported(format!("tensor {} has no data", t.name)))?;
    let converted = t.convert && t.from != t.to;
    // Asked before the tensor's progress starts: the source may run a calibration pass. The last
    // factorization is let go first, so a pass never runs beside the previous pass's moments.
    let moments = match opts.moments {
        Some(m) if converted && t.to.block_elems() > 1 && t.name != "token_embd.weight" => {
            let previous = last.take();
            let h = m.input_moments(&t.name)?;
            *last = previous.filter(|(seen, _)| h.as_ref().is_some_and(|h| Arc::ptr_eq(seen, h)));
            h
        }
        _ => None,
    };
    if !progress(&Progress {
        index,
        total,
        tensor: t,
        rows_done: 0,
    }) {
        return Err(CompressError::Interrupted);
    }
    summary.bytes_in += view.data.len() as u64;
    if !converted {
        // Copied, or already the target type: requantizing would only add error.
        return Ok(std::borrow::Cow::Borrowed(view.data));
    }
    if chosen != t.to {
        summary.fallbacks.push((t.name.clone(), chosen, t.to));
    }
    let importance = match opts.imatrix {
        Some(m) => {
            let imp = m.importance(&t.name);
            if let Some(v) = &imp {
                if v.len() != t.cols {
                    return Err(CompressError::BadImatrix {
                        what: opts.imatrix_name.clone().unwrap_or_default(),
                        reason: format!(
                            "{} has {} columns there but {} in the model: \
                                 was it made for another model?",
                            t.name,
                            v.len(),
                            t.cols
                        ),
                    });
                }
            } else {
                summary.without_importance.push(t.name.clone());
            }
            imp
        }
        None => None,
    };
    // Without calibration moments, an importance matrix with input means stands for them.
    let means = match (&moments, opts.imatrix, &importance) {
        (None, Some(m), Some(imp)) if t.to.block_elems() > 1 && t.name != "token_embd.weight" => {
            match m.input_means(&t.name).filter(|mu| mu.len() == t.cols) {
                Some(mu) => {
                    summary.mean_aware += 1;
                    let f = MeanFeedback::new(imp, &mu).map_err(|e| CompressError::BadImatrix {
                        what: opts.imatrix_name.clone().unwrap_or_default(),
                        reason: format!("{}: {e}; make it again with `edgelm imatrix`", t.name),
                    })?;
                    Some(f)
                }
                None => None,
            }
        }
        _ => None,
    };
    if moments.is_some() {
        summary.fed_back += 1;
    }
    let compensator = match (moments, compute) {
        (Some(h), Some(compute)) => {
            // q, k and v (gate and up) read one input: one factorization.
            let c = match last.as_ref() {
                Some((seen, c)) if Arc::ptr_eq(seen, &h) => c.clone(),
                _ => {
                    let c = Arc::new(Compensator::new(&h, t.cols, compute)?);
                    *last = Some((h.clone(), c.clone()));
                    c
                }
            };
            Some((c, compute))
        }
        _ => None,
    };
    // A fed-back matrix's blocks weigh each column by what its error costs once the
    // later columns absorbed what they can, not by its energy alone.
    let importance = match (&compensator, &means) {
        (Some((c, _)), _) => Some(c.conditional_importance()),
        (None, Some(f)) => Some(f.conditional_importance().to_vec()),
        _ => importance,
    };
    let mut rows_done = |rows| {
        progress(&Progress {
            index,
            total,
            tensor: t,
            rows_done: rows,
        })
    };
    Ok(std::borrow::Cow::Owned(match &compensator {
        Some((c, compute)) => feed_back(
            view.data,
            t,
            importance.as_deref(),
            c,
            compute,
            &mut rows_done,
        )?,
        None => convert(
            view.data,
            t,
            importance.as_deref(),
            means.as_ref(),
            opts.threads,
            &mut rows_done,
        )?,
    }))
}

/// Rows of `src` (type `t.from`) requantized to `t.to` on `threads` threads, each row's
/// rounding errors carried along the inputs' means when `means` is given.
fn convert(
    src: &[u8],
    t: &TensorPlan,
    importance: Option<&[f32]>,
    means: Option<&MeanFeedback>,
    threads: usize,
    progress: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<u8>> {
    let in_row = edgelm_quant::row_bytes(t.from, t.cols)?;
    let out_row = edgelm_quant::row_bytes(t.to, t.cols)?;
    crate::rows::map_rows(
        t.rows,
        out_row,
        threads,
        &|r, out| {
            let mut row = vec![0f32; t.cols];
            edgelm_quant::dequantize_row(t.from, &src[r * in_row..(r + 1) * in_row], &mut row)?;
            crate::rows::check_finite(&t.name, &row)?;
            match means {
                Some(f) => {
                    let mut w = vec![0f32; t.cols];
                    edgelm_quant::weighted::error_weights(t.to, &row, importance, &mut w);
                    f.quantize_row(t.to, &mut row, &w, out)?;
                }
                None => edgelm_quant::quantize_row_weighted(t.to, &row, importance, out)?,
            }
            Ok(())
        },
        progress,
    )
}

/// [`convert`] with each row's rounding errors fed back ([`Compensator::quantize_rows`]),
/// [`crate::gptq::ROWS_AT_ONCE`] rows at a time.
fn feed_back(
    src: &[u8],
    t: &TensorPlan,
    importance: Option<&[f32]>,
    c: &Compensator,
    compute: &edgelm_kernels::Compute,
    progress: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<u8>> {
    if c.cols() != t.cols {
        return Err(CompressError::BadArgument(format!(
            "the calibration moments of {} are not {} columns wide",
            t.name, t.cols
        )));
    }
    let in_row = edgelm_quant::row_bytes(t.from, t.cols)?;
    let out_row = edgelm_quant::row_bytes(t.to, t.cols)?;
    let mut out = vec![0u8; out_row * t.rows];
    let mut done = 0;
    let chunk_rows = crate::gptq::ROWS_AT_ONCE;
    for (src, dst) in src
        .chunks(in_row * chunk_rows)
        .zip(out.chunks_mut(out_row * chunk_rows))
    {
        let n = dst.len() / out_row;
        let mut rows = vec![0f32; n * t.cols];
        let mut weights = vec![0f32; n * t.cols];
        for ((s, row), w) in src
            .chunks_exact(in_row)
            .zip(rows.chunks_exact_mut(t.cols))
            .zip(weights.chunks_exact_mut(t.cols))
        {
            edgelm_quant::dequantize_row(t.from, s, row)?;
            crate::rows::check_finite(&t.name, row)?;
            edgelm_quant::weighted::error_weights(t.to, row, importance, w);
        }
        c.quantize_rows(compute, t.to, &mut rows, &weights, dst)?;
        done += n;
        if !progress(done) {
            return Err(CompressError::Interrupted);
        }
    }
    Ok(out)
}
