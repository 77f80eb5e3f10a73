//! `Linear`: every projection in every model. A weight in its stored type plus an optional bias.

use crate::{ModelError, Result};
use edgelm_gguf::{GgufFile, MappedFile};
use edgelm_kernels::{ActivationPrecision, Compute, Layout, Product, Weight};
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// Repacked rows: copied in memory, or mapped from the repack cache.
enum Repacked {
    Owned(Vec<u8>),
    Mapped(Arc<MappedFile>, Range<usize>),
}

impl Repacked {
    fn bytes(&self) -> &[u8] {
        match self {
            Repacked::Owned(v) => v,
            Repacked::Mapped(m, r) => &m.bytes()[r.clone()],
        }
    }
}

/// A weight matrix in its quantized type: left in the mapped file, or repacked on first use
/// for the compute context's kernels ([`WeightRef::view_for`]).
#[derive(Clone)]
pub struct WeightRef {
    file: Arc<GgufFile>,
    range: Range<usize>,
    /// Set on the first product (or from the repack cache): the repacked rows, or None where
    /// the GGUF layout is best. Shared by clones, so a tied output head and the embedding table
    /// read one copy.
    interleaved: Arc<OnceLock<Option<Repacked>>>,
    pub name: String,
    pub ty: edgelm_gguf::GgmlType,
    pub rows: usize,
    pub cols: usize,
}

impl WeightRef {
    /// Look up a 2-D tensor; `cols` (the row length) must equal `expect_cols` when given.
    pub fn load(
        file: &Arc<GgufFile>,
        name: &str,
        expect_cols: Option<usize>,
        arch: &str,
    ) -> Result<WeightRef> {
        let info = file
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into(), arch.into()))?;
        let (cols, rows) = match info.dims[..] {
            [c, r] => (c as usize, r as usize),
            [c] => (c as usize, 1),
            _ => {
                return Err(ModelError::Shape {
                    name: name.into(),
                    got: info.dims.clone(),
                    expected: "a matrix".into(),
                })
            }
        };
        if let Some(want) = expect_cols {
            if cols != want {
                return Err(ModelError::Shape {
                    name: name.into(),
                    got: info.dims.clone(),
                    expected: format!("rows of {want}"),
                });
            }
        }
        if !edgelm_quant::can_dequantize(info.ty) {
            return Err(ModelError::UnsupportedType {
                name: name.into(),
                ty: info.ty,
            });
        }
        let range = file.tensor_range(name).unwrap_or(0..0);
        Ok(WeightRef {
            file: file.clone(),
            range,
            interleaved: Arc::new(OnceLock::new()),
            name: name.into(),
            ty: info.ty,
            rows,
            cols,
        })
    }

    /// The weight as `c`'s kernels read it fastest. The first call may repack it (in parallel,
    /// once; the mapped original is then released from resident memory): repacking at load
    /// would fault in every page before the first request, whether it is used or not.
    pub fn view_for(&self, c: &Compute) -> Weight<'_> {
        self.interleaved
            .get_or_init(|| self.repack(c).map(Repacked::Owned));
        self.view()
    }

    /// Use `range` of `map` (the repack cache) as this weight's repacked rows; no effect if it
    /// was already repacked or found to need none.
    pub(crate) fn use_mapped(&self, map: Arc<MappedFile>, range: Range<usize>) {
        let _ = self.interleaved.set(Some(Repacked::Mapped(map, range)));
    }

    /// The rows repacked for `c`, None where its kernels want the GGUF layout. The original's
    /// pages are released as they are copied.
    pub(crate) fn repack(&self, c: &Compute) -> Option<Vec<u8>> {
        {
            let w = Weight::gguf(
                self.ty,
                self.rows,
                self.cols,
                &self.file.bytes()[self.range.clone()],
            );
            if !c.wants_interleaved(w.ty) || w.rows == 0 {
                return None;
            }
            // A few MiB of rows at a time, each released once copied: the mapped original and
            // the copy never coexist whole (the output head alone is 136 MB on qwen2.5).
            let row_bytes = w.data.len() / w.rows;
            let panel = edgelm_kernels::interleave::PANEL;
            let chunk_rows = ((4 << 20) / row_bytes.max(1)).max(panel) / panel * panel;
            let mut data = vec![0u8; w.data.len()];
            for r0 in (0..w.rows).step_by(chunk_rows) {
                let r1 = (r0 + chunk_rows).min(w.rows);
                let bytes = r0 * row_bytes..r1 * row_bytes;
                let part = Weight::gguf(w.ty, r1 - r0, w.cols, &w.data[bytes.clone()]);
                c.interleave_into(part, &mut data[bytes.clone()]).ok()?;
                let start = self.range.start;
                self.file.release(start + bytes.start..start + bytes.end);
            }
            Some(data)
        }
    }

    /// The weight as it is now: repacked if [`WeightRef::view_for`] did so, else as GGUF has it.
    pub fn view(&self) -> Weight<'_> {
        match self.interleaved.get().and_then(|d| d.as_ref()) {
            Some(data) => Weight {
                ty: self.ty,
                rows: self.rows,
                cols: self.cols,
                data: data.bytes(),
                layout: Layout::Interleaved,
            },
            None => Weight::gguf(
                self.ty,
                self.rows,
                self.cols,
                &self.file.bytes()[self.range.clone()],
            ),
        }
    }

    pub fn n_bytes(&self) -> usize {
        self.range.len()
    }

    /// Rows `ids` (checked against `rows` by the caller) dequantized into consecutive
    /// `cols`-wide slices of `out`: the embedding lookup. Interleaved rows are gathered back to
    /// GGUF order through one buffer for the whole call.
    pub fn rows(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let w = self.view();
        let row_bytes = w.data.len() / w.rows.max(1);
        let err = |e: &dyn std::fmt::Display| ModelError::Batch(format!("{}: {e}", self.name));
        let mut gathered = match w.layout {
            Layout::Interleaved => vec![0u8; row_bytes],
            Layout::Gguf => Vec::new(),
        };
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = id as usize;
            let row = match w.layout {
                Layout::Gguf => &w.data[r * row_bytes..(r + 1) * row_bytes],
                Layout::Interleaved => {
                    edgelm_kernels::interleave::deinterleave_row(
                        self.ty,
                        row_bytes,
                        w.data,
                        r,
                        &mut gathered,
                    )
                    .map_err(|e| err(&e))?;
                    &gathered
                }
            };
            edgelm_quant::dequantize_row(self.ty, row, dst).map_err(|e| err(&e))?;
        }
        Ok(())
    }
}

/// Read a 1-D F32 tensor (norm weights, biases) of length `len`.
pub fn load_vector(file: &GgufFile, name: &str, len: usize, arch: &str) -> Result<Vec<f32>> {
    let t = file
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.into(), arch.into()))?;
    if t.dims() != [len as u64] {
        return Err(ModelError::Shape {
            name: name.into(),
            got: t.dims().to_vec(),
            expected: format!("[{len}]"),
        });
    }
    let mut out = vec![0f32; len];
    edgelm_quant::dequantize_row(t.ty(), t.data, &mut out).map_err(|_| {
        ModelError::UnsupportedType {
            name: name.into(),
            ty: t.ty(),
        }
    })?;
    Ok(out)
}

/// A tap on the forward pass: sees every projection's input and the residual stream between
/// blocks. Its methods do nothing by default, so a forward pass without one pays nothing;
/// importance matrices and block influence are collected through it.
pub trait Observer: Sync {
    /// `x` holds `rows` inputs of `cols` values about to be multiplied by the projection named
    /// `weight` (its dense GGUF tensor name, `{prefix}.weight`, whatever its kind).
    fn linear_input(&self, weight: &str, x: &[f32], cols: usize, rows: usize) {
        let _ = (weight, x, cols, rows);
    }

    /// `y` holds the `rows` outputs (`cols` wide, before any bias) the projection named `weight`
    /// just computed.
    fn linear_output(&self, weight: &str, y: &[f32], cols: usize, rows: usize) {
        let _ = (weight, y, cols, rows);
    }

    /// `x` holds the residual stream of `rows` tokens (`cols` wide) entering block `layer`;
    /// `layer` equal to the number of blocks is the stream leaving the last one. Called once
    /// per layer per chunk of tokens, in layer order.
    fn residual(&self, layer: usize, x: &[f32], cols: usize, rows: usize) {
        let _ = (layer, x, cols, rows);
    }
}

/// What a forward pass runs with: the compute context and, optionally, an observer.
#[derive(Clone, Copy)]
pub struct Forward<'a> {
    pub compute: &'a Compute,
    pub observer: Option<&'a dyn Observer>,
}

impl<'a> Forward<'a> {
    pub fn new(compute: &'a Compute) -> Forward<'a> {
        Forward {
            compute,
            observer: None,
        }
    }

    fn observe(&self, l: &Linear, x: &[f32], n: usize) {
        if let Some(o) = self.observer {
            let cols = l.in_features();
            o.linear_input(&l.name, &x[..n * cols], cols, n);
        }
    }

    fn observe_output(&self, l: &Linear, y: &[f32], n: usize) {
        if let Some(o) = self.observer {
            let cols = l.out_features();
            o.linear_output(&l.name, &y[..n * cols], cols, n);
        }
    }

    pub(crate) fn residual(&self, layer: usize, x: &[f32], cols: usize, n: usize) {
        if let Some(o) = self.observer {
            o.residual(layer, &x[..n * cols], cols, n);
        }
    }
}

/// How a projection's weight is stored: the closed set of kinds `Linear` runs.
#[derive(Clone)]
pub enum Projection {
    /// One matrix W (`{prefix}.weight`).
    Dense(WeightRef),
    /// W ≈ A·B, a factored matrix run as two products: `inner` = B (rank × inputs,
    /// `{prefix}.lowrank_in.weight`) first, then `outer` = A (outputs × rank,
    /// `{prefix}.lowrank_out.weight`). Reads rank·(inputs + outputs) weights instead of
    /// inputs·outputs.
    LowRank { inner: WeightRef, outer: WeightRef },
}

/// Tensor names of a factored projection `{prefix}`: (inner, outer).
pub fn low_rank_names(prefix: &str) -> (String, String) {
    (
        format!("{prefix}.lowrank_in.weight"),
        format!("{prefix}.lowrank_out.weight"),
    )
}

pub struct Linear {
    /// `{prefix}.weight`: the dense name, also for a factored projection (what an observer and
    /// an importance matrix key it by).
    pub name: String,
    pub projection: Projection,
    pub bias: Option<Vec<f32>>,
    /// How finely the fast path quantizes this projection's input.
    pub input_precision: ActivationPrecision,
}

impl Linear {
    /// `{prefix}.weight` with input width `in_features` (or its factored pair, see
    /// [`Projection::LowRank`]), and `{prefix}.bias` if the file has it.
    pub fn load(
        file: &Arc<GgufFile>,
        prefix: &str,
        in_features: usize,
        arch: &str,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let (inner_name, outer_name) = low_rank_names(prefix);
        let projection =
            if file.tensor_info(&name).is_none() && file.tensor_info(&inner_name).is_some() {
                let inner = WeightRef::load(file, &inner_name, Some(in_features), arch)?;
                let outer = WeightRef::load(file, &outer_name, Some(inner.rows), arch)?;
                Projection::LowRank { inner, outer }
            } else {
                Projection::Dense(WeightRef::load(file, &name, Some(in_features), arch)?)
            };
        let mut linear = Linear::new(name, projection);
        let bias_name = format!("{prefix}.bias");
        if file.tensor_info(&bias_name).is_some() {
            linear.bias = Some(load_vector(file, &bias_name, linear.out_features(), arch)?);
        }
        Ok(linear)
    }

    /// A dense projection without bias over an already loaded weight (a tied output head).
    pub fn dense(weight: WeightRef) -> Linear {
        Linear::new(weight.name.clone(), Projection::Dense(weight))
    }

    fn new(name: String, projection: Projection) -> Linear {
        Linear {
            name,
            projection,
            bias: None,
            input_precision: ActivationPrecision::Int8,
        }
    }

    pub fn out_features(&self) -> usize {
        match &self.projection {
            Projection::Dense(w) => w.rows,
            Projection::LowRank { outer, .. } => outer.rows,
        }
    }

    pub fn in_features(&self) -> usize {
        match &self.projection {
            Projection::Dense(w) => w.cols,
            Projection::LowRank { inner, .. } => inner.cols,
        }
    }

    /// Bytes of weights one forward reads.
    /// The matrices this projection multiplies by.
    pub fn weights(&self) -> Vec<&WeightRef> {
        match &self.projection {
            Projection::Dense(w) => vec![w],
            Projection::LowRank { inner, outer } => vec![inner, outer],
        }
    }

    pub fn n_bytes(&self) -> usize {
        match &self.projection {
            Projection::Dense(w) => w.n_bytes(),
            Projection::LowRank { inner, outer } => inner.n_bytes() + outer.n_bytes(),
        }
    }

    /// `out[t] = W·x[t] + b` for `n` tokens.
    pub fn forward(&self, f: &Forward, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        f.observe(self, x, n);
        let c = f.compute;
        match &self.projection {
            Projection::Dense(w) => {
                c.matmul_with(w.view_for(c), x, n, out, self.input_precision)?
            }
            Projection::LowRank { inner, outer } => with_middle(n * inner.rows, |mid| {
                c.matmul_with(inner.view_for(c), x, n, mid, self.input_precision)?;
                c.matmul_with(outer.view_for(c), mid, n, out, ActivationPrecision::Int8)
            })?,
        }
        f.observe_output(self, out, n);
        self.add_bias(out);
        Ok(())
    }

    /// [`Linear::forward`] of several layers over the same input `x` in one fork/join (q, k
    /// and v; gate and up): while decoding, each fork/join costs about as much as a small
    /// product. A factored layer's first product joins the group; its second follows alone.
    pub fn forward_group<const N: usize>(
        f: &Forward,
        layers: [&Linear; N],
        x: &[f32],
        n: usize,
        outs: [&mut [f32]; N],
    ) -> Result<()> {
        for l in layers {
            f.observe(l, x, n);
        }
        let c = f.compute;
        // A factored layer's first product writes its rank-wide middle; its second follows.
        let widths: [usize; N] = std::array::from_fn(|i| match &layers[i].projection {
            Projection::Dense(_) => 0,
            Projection::LowRank { inner, .. } => n * inner.rows,
        });
        with_middle(widths.iter().sum(), |all| {
            let mut mids: [&mut [f32]; N] = std::array::from_fn(|_| <&mut [f32]>::default());
            let mut rest = all;
            for (mid, &w) in mids.iter_mut().zip(&widths) {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(w);
                *mid = head;
                rest = tail;
            }
            let mut outs = outs;
            {
                let mut products: Vec<Product<'_, '_>> = layers
                    .iter()
                    .zip(outs.iter_mut())
                    .zip(mids.iter_mut())
                    .map(|((l, out), mid)| match &l.projection {
                        Projection::Dense(w) => Product {
                            w: w.view_for(c),
                            act: l.input_precision,
                            out,
                        },
                        Projection::LowRank { inner, .. } => Product {
                            w: inner.view_for(c),
                            act: l.input_precision,
                            out: mid,
                        },
                    })
                    .collect();
                c.matmul_group(x, n, &mut products)?;
            }
            for ((l, out), mid) in layers.iter().zip(outs.iter_mut()).zip(&mids) {
                if let Projection::LowRank { outer, .. } = &l.projection {
                    c.matmul_with(outer.view_for(c), mid, n, out, ActivationPrecision::Int8)?;
                }
                f.observe_output(l, out, n);
                l.add_bias(out);
            }
            Ok(())
        })
    }

    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
    }
}

/// Runs `f` on a zeroed buffer of `len` floats that lives on with the thread: the rank-wide
/// middle of low-rank products, reused from call to call instead of allocated per token.
fn with_middle<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local!(static MIDDLE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) });
    // Taken out while `f` runs, so a nested call would get a fresh buffer rather than a borrow panic.
    let mut buf = MIDDLE.with(|m| std::mem::take(&mut *m.borrow_mut()));
    buf.clear();
    buf.resize(len, 0.0);
    let r = f(&mut buf);
    MIDDLE.with(|m| *m.borrow_mut() = buf);
    r
}
