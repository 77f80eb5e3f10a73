//! Row-parallel tensor rewriting shared by quantize, prune and low-rank: a tensor's rows are
//! independent, so each thread makes a contiguous run of them.

use crate::{CompressError, Result};
use edgelm_gguf::{GgmlType, GgufFile};

/// `n_rows` output rows of `out_row` bytes, row `r` made by `make(r, dst)`, on `threads`
/// threads; `progress(rows_done)` is called after each chunk and stops the run by returning
/// false.
pub(crate) fn map_rows(
    n_rows: usize,
    out_row: usize,
    threads: usize,
    make: &(dyn Fn(usize, &mut [u8]) -> Result<()> + Sync),
    progress: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; out_row * n_rows];
    if n_rows == 0 || out_row == 0 {
        return Ok(out);
    }
    // Chunks of rows small enough for a smooth bar, large enough to keep threads busy.
    let chunk_rows = (n_rows / 64).clamp(1, 256);
    let threads = threads.max(1);
    let mut done = 0;
    for (round, chunk_out) in out.chunks_mut(out_row * chunk_rows * threads).enumerate() {
        let first = round * chunk_rows * threads;
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk_out
                .chunks_mut(out_row * chunk_rows)
                .enumerate()
                .map(|(i, part)| {
                    s.spawn(move || -> Result<()> {
                        let r0 = first + i * chunk_rows;
                        for (j, dst) in part.chunks_exact_mut(out_row).enumerate() {
                            make(r0 + j, dst)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            join_all(handles)
        })?;
        done += chunk_out.len() / out_row;
        if !progress(done) {
            return Err(CompressError::Interrupted);
        }
    }
    Ok(out)
}

/// Joins scoped threads that each return a `Result`: the first error, or a panic, wins (the
/// scope still joins the rest).
pub(crate) fn join_all(handles: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    handles
        .into_iter()
        .try_for_each(|h| h.join().unwrap_or(Err(CompressError::Panicked)))
}

pub(crate) fn check_finite(name: &str, row: &[f32]) -> Result<()> {
    match row.iter().position(|v| !v.is_finite()) {
        Some(bad) => Err(CompressError::Unsupported(format!(
            "tensor {name} holds a non-finite value ({}) at column {bad}",
            row[bad]
        ))),
        None => Ok(()),
    }
}

/// A tensor of `f` as (row length, rows, type, bytes); a vector is one row.
pub(crate) struct Matrix<'a> {
    pub name: &'a str,
    pub cols: usize,
    pub rows: usize,
    pub ty: GgmlType,
    pub data: &'a [u8],
}

impl<'a> Matrix<'a> {
    pub fn of(f: &'a GgufFile, name: &'a str) -> Result<Matrix<'a>> {
        let v = f
            .tensor(name)
            .ok_or_else(|| CompressError::Unsupported(format!("the model has no tensor {name}")))?;
        let cols = v.dims().first().copied().unwrap_or(1) as usize;
        let n: u64 = v.dims().iter().product();
        let rows = if cols == 0 {
            0
        } else {
            (n / cols as u64) as usize
        };
        if !edgelm_quant::can_dequantize(v.ty()) {
            return Err(CompressError::Unsupported(format!(
                "tensor {name} is {}, which edgelm cannot read",
                v.ty()
            )));
        }
        Ok(Matrix {
            name,
            cols,
            rows,
            ty: v.ty(),
            data: v.data,
        })
    }

    pub fn row_bytes(&self) -> Result<usize> {
        Ok(edgelm_quant::row_bytes(self.ty, self.cols)?)
    }

    /// Row `r` as f32 into `out` (`cols` long).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let rb = self.row_bytes()?;
        edgelm_quant::dequantize_row(self.ty, &self.data[r * rb..(r + 1) * rb], out)?;
        check_finite(self.name, out)
    }

    /// Every row as f32, row-major.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row(r, dst)?;
        }
        Ok(out)
    }
}

/// Row-major `values` (`cols` wide) stored as `ty`, or as the type `fit_rows` falls back to
/// when the rows are not whole blocks of it; rounded with `importance` per column when given.
pub(crate) fn encode(
    ty: GgmlType,
    values: &[f32],
    cols: usize,
    importance: Option<&[f32]>,
    threads: usize,
) -> Result<(GgmlType, Vec<u8>)> {
    let ty = crate::mix::fit_rows(ty, cols);
    let rows = values.len() / cols.max(1);
    let out_row = edgelm_quant::row_bytes(ty, cols)?;
    let data = map_rows(
        rows,
        out_row,
        threads,
        &|r, dst| {
            let row = &values[r * cols..(r + 1) * cols];
            edgelm_quant::quantize_row_weighted(ty, row, importance, dst)?;
            Ok(())
        },
        &mut |_| true,
    )?;
    Ok((ty, data))
}

/// Whether one decoded token reads all of tensor `name`: every matrix does, but an embedding
/// table only when it doubles as the output head (`tied`: the file has no `output.weight`),
/// since otherwise a token reads one row of it. What the "weights read per token" figures count.
pub(crate) fn read_per_token(name: &str, n_dims: usize, tied: bool) -> bool {
    n_dims >= 2 && (name != "token_embd.weight" || tied) && !name.contains("_norm.")
}
