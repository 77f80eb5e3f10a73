//! `Linear`: every projection in every model. A weight in its stored type plus an optional bias.

use crate::{ModelError, Result};
use edgelm_gguf::GgufFile;
use edgelm_kernels::{ActivationPrecision, Compute, Layout, Product, Weight};
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// A weight matrix in its quantized type: left in the mapped file, or repacked on first use
/// for the compute context's kernels ([`WeightRef::view_for`]).
#[derive(Clone)]
pub struct WeightRef {
    file: Arc<GgufFile>,
    range: Range<usize>,
    /// Set on the first product: the repacked rows, or None where the GGUF layout is best.
    /// Shared by clones, so a tied output head and the embedding table read one copy.
    interleaved: Arc<OnceLock<Option<Vec<u8>>>>,
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
        self.interleaved.get_or_init(|| {
            let w = self.view();
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
        });
        self.view()
    }

    /// The weight as it is now: repacked if [`WeightRef::view_for`] did so, else as GGUF has it.
    pub fn view(&self) -> Weight<'_> {
        match self.interleaved.get().and_then(|d| d.as_ref()) {
            Some(data) => Weight {
                ty: self.ty,
                rows: self.rows,
                cols: self.cols,
                data,
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

/// A tap on the forward pass: sees every projection's input. Its methods do nothing by default,
/// so a forward pass without one pays nothing; importance matrices are collected through it.
pub trait Observer: Sync {
    /// `x` holds `rows` inputs of `cols` values about to be multiplied by the weight `weight`
    /// (its GGUF tensor name).
    fn linear_input(&self, weight: &str, x: &[f32], cols: usize, rows: usize) {
        let _ = (weight, x, cols, rows);
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
            o.linear_input(&l.weight.name, &x[..n * cols], cols, n);
        }
    }
}

pub struct Linear {
    pub weight: WeightRef,
    pub bias: Option<Vec<f32>>,
    /// How finely the fast path quantizes this projection's input.
    pub input_precision: ActivationPrecision,
}

impl Linear {
    /// `{prefix}.weight` with input width `in_features`, and `{prefix}.bias` if the file has it.
    pub fn load(
        file: &Arc<GgufFile>,
        prefix: &str,
        in_features: usize,
        arch: &str,
    ) -> Result<Linear> {
        let weight = WeightRef::load(file, &format!("{prefix}.weight"), Some(in_features), arch)?;
        let bias_name = format!("{prefix}.bias");
        let bias = match file.tensor_info(&bias_name) {
            Some(_) => Some(load_vector(file, &bias_name, weight.rows, arch)?),
            None => None,
        };
        Ok(Linear {
            weight,
            bias,
            input_precision: ActivationPrecision::Int8,
        })
    }

    pub fn out_features(&self) -> usize {
        self.weight.rows
    }

    pub fn in_features(&self) -> usize {
        self.weight.cols
    }

    /// `out[t] = W·x[t] + b` for `n` tokens.
    pub fn forward(&self, f: &Forward, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        f.observe(self, x, n);
        let c = f.compute;
        c.matmul_with(self.view_for(c), x, n, out, self.input_precision)?;
        self.add_bias(out);
        Ok(())
    }

    /// [`Linear::forward`] of several layers over the same input `x` in one fork/join (q, k
    /// and v; gate and up): while decoding, each fork/join costs about as much as a small
    /// product.
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
        let mut pairs = layers.into_iter().zip(outs);
        let mut products: [Product<'_, '_>; N] = std::array::from_fn(|_| {
            let (l, out) = pairs.next().expect("one output per layer");
            Product {
                w: l.view_for(c),
                act: l.input_precision,
                out,
            }
        });
        c.matmul_group(x, n, &mut products)?;
        for (l, p) in layers.iter().zip(products.iter_mut()) {
            l.add_bias(p.out);
        }
        Ok(())
    }

    fn view_for(&self, c: &Compute) -> Weight<'_> {
        self.weight.view_for(c)
    }

    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
    }
}
