//! The fast path's execution: each product's activations quantized for its kernel, then one
//! fork/join over every product's row ranges (GGUF rows, interleaved panels, or panels decoded
//! once for a prompt).

use super::{Compute, Layout, Shared, Weight, MAX_GROUP, ROWS_PER_TASK};
use crate::interleave::PANEL as INTERLEAVED_PANEL;
use crate::interleave::{pack_activations, packed_act_bytes};
use crate::qdot::{InterleavedDotFn, Out, PanelPrefill, QuantKernel, MAX_COLS};
use edgelm_quant::dequantize_row;
use std::cell::RefCell;

thread_local! {
    /// The refined quantization's residual row.
    static RESIDUAL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One token's activations in the GGUF block format, before packing.
    static BLOCKS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// A panel decoded for a prompt ([`crate::qdot::PanelPrefill`]), in cache lines so its
    /// 32-byte images never straddle two.
    static DECODED: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// One cache line of scratch.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Compute {
    /// The quantized products of `plans`, all of input `x`: activations quantized for each,
    /// then one fork/join over every product's row ranges.
    pub(super) fn run_plans(&self, plans: &[Plan<'_>], x: &[f32], n_tokens: usize) {
        let threads = self.pool.n_threads();
        let mut buffer = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        // Cache-line aligned: the kernels read each token's packed activations with 64-byte
        // loads, once per weight row (unaligned, every load splits two lines: ~15% of prefill).
        // Products whose kernels read the same activation bytes (q, k and v of one type)
        // share one quantization: product i's activations are `len[i]` bytes at `start[i]`,
        // written by the first product of its kind (`owner[i]`).
        let (mut start, mut len) = ([0usize; MAX_GROUP], [0usize; MAX_GROUP]);
        let mut owner = [true; MAX_GROUP];
        let mut total = 0;
        for (i, p) in plans.iter().enumerate() {
            match (0..i).find(|&j| plans[j].same_activations(p)) {
                Some(j) => (start[i], len[i], owner[i]) = (start[j], len[j], false),
                None => {
                    (start[i], len[i]) = (total, n_tokens * p.token_bytes());
                    total += len[i].next_multiple_of(64);
                }
            }
        }
        let range = |i: usize| start[i]..start[i] + len[i];
        buffer.resize(total + 64, 0);
        let skew = buffer.as_ptr().align_offset(64).min(64);
        let acts = &mut buffer[skew..skew + total];
        for (i, p) in plans.iter().enumerate().filter(|(i, _)| owner[*i]) {
            self.quantize_activations(p, x, n_tokens, &mut acts[range(i)]);
        }
        let acts = &acts[..];
        let mut first = [0usize; MAX_GROUP + 1];
        for (i, p) in plans.iter().enumerate() {
            first[i + 1] = first[i] + p.w.rows.div_ceil(p.rows_per_task(threads, n_tokens));
        }
        self.pool.run(first[plans.len()], &|task| {
            let i = (0..plans.len()).find(|&i| task < first[i + 1]).unwrap_or(0);
            plans[i].run_task(&acts[range(i)], n_tokens, task - first[i], threads);
        });
    }

    /// Each token's row of `x` quantized for `p` (both passes when refined) into `acts`.
    fn quantize_activations(&self, p: &Plan<'_>, x: &[f32], n_tokens: usize, acts: &mut [u8]) {
        let (k, w, passes) = (p.k, p.w, p.passes);
        let act_bytes = p.act_bytes();
        let (packed, slot) = (p.packed(), p.slot());
        let cols = w.cols;
        // Each pass quantizes into GGUF blocks (the refined one the first one's residual),
        // then lands in its slot as is, or packed for interleaved weights.
        let quantize_token = |t: usize, dst: &mut [u8]| {
            let xt = &x[t * cols..(t + 1) * cols];
            BLOCKS.with_borrow_mut(|own| {
                // GGUF blocks go straight into the slot, or into a scratch row to be packed.
                let blocks: &mut [u8] = if packed {
                    own.resize(passes * act_bytes, 0);
                    own
                } else {
                    &mut dst[..]
                };
                // SAFETY: the kernel was chosen for this CPU; each pass holds `cols` elements.
                unsafe { (k.quantize)(xt, &mut blocks[..act_bytes]) };
                if passes > 1 {
                    let (first, second) = blocks.split_at_mut(act_bytes);
                    RESIDUAL.with_borrow_mut(|residual| {
                        residual.resize(cols, 0.0);
                        let _ = dequantize_row(k.act, first, residual);
                        residual.iter_mut().zip(xt).for_each(|(r, x)| *r = x - *r);
                        // SAFETY: as above.
                        unsafe { (k.quantize)(residual, &mut second[..act_bytes]) };
                    });
                }
                if packed {
                    for pass in 0..passes {
                        let src = &own[pass * act_bytes..(pass + 1) * act_bytes];
                        // Lengths match by construction.
                        let _ =
                            pack_activations(w.ty, src, &mut dst[pass * slot..(pass + 1) * slot]);
                    }
                }
            });
        };
        let token_bytes = p.token_bytes();
        if n_tokens < 4 * self.pool.n_threads() {
            for (t, dst) in acts
                .chunks_exact_mut(token_bytes)
                .take(n_tokens)
                .enumerate()
            {
                quantize_token(t, dst);
            }
        } else {
            let per_task = n_tokens.div_ceil(2 * self.pool.n_threads());
            let shared_acts = Shared(acts.as_mut_ptr());
            self.pool.run(n_tokens.div_ceil(per_task), &|task| {
                for t in task * per_task..((task + 1) * per_task).min(n_tokens) {
                    // SAFETY: token t's bytes are inside `acts` and written by this task only;
                    // `run` joins before the borrow ends.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            shared_acts.get().add(t * token_bytes),
                            token_bytes,
                        )
                    };
                    quantize_token(t, dst);
                }
            });
        }
    }
}

/// One quantized product, its shapes checked: the kernel, the weight, and where results go.
#[derive(Clone, Copy)]
pub(super) struct Plan<'a> {
    pub(super) k: QuantKernel,
    pub(super) w: Weight<'a>,
    pub(super) row_bytes: usize,
    /// 1, or 2 for refined activations.
    pub(super) passes: usize,
    pub(super) out: Shared<f32>,
}

impl Plan<'_> {
    fn act_bytes(&self) -> usize {
        self.k.act.bytes_for(self.w.cols as u64).unwrap_or(0) as usize
    }

    /// The interleaved kernel, when the weight is interleaved (only sent here with it at hand).
    fn interleaved(&self) -> Option<InterleavedDotFn> {
        self.k
            .interleaved
            .filter(|_| self.w.layout == Layout::Interleaved)
    }

    /// The decode-once prompt path, for a single pass over enough tokens to pay for decoding
    /// and weights in the layout it decodes.
    fn prefill(&self, n_tokens: usize) -> Option<PanelPrefill> {
        let interleaved = self.w.layout == Layout::Interleaved;
        self.k.prefill.filter(|p| {
            self.passes == 1 && n_tokens >= p.min_tokens && p.from_interleaved == interleaved
        })
    }

    fn packed(&self) -> bool {
        self.interleaved().is_some()
    }

    /// Bytes of one pass of one token's activations.
    fn slot(&self) -> usize {
        if self.packed() {
            packed_act_bytes(self.w.ty, self.w.cols)
        } else {
            self.act_bytes()
        }
    }

    fn token_bytes(&self) -> usize {
        self.passes * self.slot()
    }

    /// Whether `other` reads exactly this product's activation bytes: same format, passes and
    /// width, and the same packing (which folds the weight type's code offset in).
    fn same_activations(&self, other: &Plan<'_>) -> bool {
        self.k.act == other.k.act
            && self.passes == other.passes
            && self.w.cols == other.w.cols
            && self.packed() == other.packed()
            && (!self.packed() || self.w.ty == other.w.ty)
    }

    /// Long contiguous row ranges, each streamed in order so the hardware prefetcher runs ahead
    /// (short interleaved ranges halve decode speed). A product read once per token (decoding)
    /// takes one range per thread: four each measured 15–20% slower on SmolLM2, whose small
    /// matrices pay a stream's start four times over. The prompt path, bound by arithmetic
    /// rather than memory, takes four per thread to even out the load.
    fn rows_per_task(&self, threads: usize, n_tokens: usize) -> usize {
        let ranges = if self.prefill(n_tokens).is_some() {
            4
        } else {
            1
        };
        self.w
            .rows
            .div_ceil(ranges * threads)
            .next_multiple_of(ROWS_PER_TASK)
    }

    /// Task `task` of this product: its row range against every token of `acts`.
    fn run_task(&self, acts: &[u8], n_tokens: usize, task: usize, threads: usize) {
        let (w, row_bytes, passes) = (self.w, self.row_bytes, self.passes);
        let interleaved = self.interleaved();
        let dot = interleaved.unwrap_or(self.k.row_dot);
        let slot = self.slot();
        let shared = self.out;
        let per_task = self.rows_per_task(threads, n_tokens);
        let tile = MAX_COLS / passes;
        let mut cols: [&[u8]; MAX_COLS] = [&[]; MAX_COLS];
        let mut dots = [0f32; ROWS_PER_TASK * MAX_COLS];
        let task_rows = task * per_task..((task + 1) * per_task).min(w.rows);
        let prefill = self.prefill(n_tokens);
        for r0 in task_rows.clone().step_by(ROWS_PER_TASK) {
            let r1 = (r0 + ROWS_PER_TASK).min(task_rows.end);
            if let Some(p) = prefill.filter(|_| r1 - r0 == INTERLEAVED_PANEL) {
                let block = &w.data[r0 * row_bytes..r1 * row_bytes];
                let at = Shared(shared.get().wrapping_add(r0));
                DECODED.with_borrow_mut(|lines| {
                    let len = (p.bytes)(w.cols);
                    lines.resize(len.div_ceil(64), Line([0; 64]));
                    // SAFETY: `lines` holds at least `len` initialized bytes.
                    let dec = unsafe {
                        std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), len)
                    };
                    // SAFETY: kernel chosen for this CPU; `block` is one whole panel.
                    unsafe { (p.decode)(block, row_bytes, dec) };
                    for t0 in (0..n_tokens).step_by(MAX_COLS) {
                        let nt = (n_tokens - t0).min(MAX_COLS);
                        for (j, c) in cols[..nt].iter_mut().enumerate() {
                            *c = &acts[(t0 + j) * slot..(t0 + j + 1) * slot];
                        }
                        // SAFETY: as for the row dots below; `dec` is the decoded panel.
                        unsafe {
                            (p.dot)(
                                dec,
                                w.cols,
                                &cols[..nt],
                                Out {
                                    ptr: at.get().add(t0 * w.rows),
                                    ld: w.rows,
                                },
                            )
                        };
                    }
                });
                continue;
            }
            // Token tiles outer, rows inner: the tile's activations and this block of rows
            // both stay in L1 while every pair is computed.
            for t0 in (0..n_tokens).step_by(tile) {
                let nt = (n_tokens - t0).min(tile);
                let nc = nt * passes;
                for (j, c) in cols[..nc].iter_mut().enumerate() {
                    *c = &acts[(t0 * passes + j) * slot..(t0 * passes + j + 1) * slot];
                }
                // The whole block of rows (for interleaved weights, one panel) in one call.
                let block = &w.data[r0 * row_bytes..r1 * row_bytes];
                let nr = r1 - r0;
                if passes == 1 {
                    // SAFETY: kernel chosen for this CPU; every row has `cols` elements;
                    // (t0 + j, r0 + r) lies in `out` and is owned by this task alone.
                    unsafe {
                        let at = shared.get().add(t0 * w.rows + r0);
                        dot(
                            block,
                            row_bytes,
                            nr,
                            &cols[..nc],
                            Out {
                                ptr: at,
                                ld: w.rows,
                            },
                        );
                    }
                    continue;
                }
                // Several passes per token: their dots are summed on the way out.
                // SAFETY: as above; `dots` holds nr × nc results.
                unsafe { dot(block, row_bytes, nr, &cols[..nc], Out::slice(&mut dots, nr)) };
                for j in 0..nt {
                    for r in 0..nr {
                        let d: f32 = (0..passes).map(|p| dots[(j * passes + p) * nr + r]).sum();
                        // SAFETY: (t0 + j, r0 + r) is inside `out`, owned by this task.
                        unsafe { *shared.get().add((t0 + j) * w.rows + r0 + r) = d };
                    }
                }
            }
        }
    }
}
