//! Kernel micro-benchmarks: weight bytes per second of each fast-path row dot (1 and 8 activation
//! rows) on every ISA this CPU runs, GGUF layout and interleaved, the precise f32 matmul, a prompt's
//! products on one thread, and the pool's per-dispatch cost.
//! `cargo bench -p edgelm-kernels` (criterion prints GiB/s; elements are MACs for the f32 path).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgelm_kernels::interleave;
use edgelm_kernels::qdot::{kernel_for, Out};
use edgelm_kernels::{Compute, Isa, Layout, Precision, ThreadPool, Weight};
use edgelm_quant::GgmlType;
use std::hint::black_box;

const COLS: usize = 4096;
const ROWS: usize = 64;

fn random_floats(n: usize, mut seed: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn quantized(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.bytes_for(values.len() as u64).expect("whole blocks") as usize];
    edgelm_quant::quantize_row(ty, values, &mut out).expect("quantizable type");
    out
}

fn row_dots(c: &mut Criterion) {
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    let mut group = c.benchmark_group("row_dot");
    for ty in types {
        let row_bytes = ty.bytes_for(COLS as u64).unwrap() as usize;
        let weights = quantized(ty, &random_floats(ROWS * COLS, 1));
        for isa in Isa::available() {
            let k = kernel_for(isa, ty).expect("weight type");
            let acts: Vec<Vec<u8>> = (0..8)
                .map(|i| quantized(k.act, &random_floats(COLS, 7 + i)))
                .collect();
            for n_acts in [1usize, 8] {
                let a: Vec<&[u8]> = acts[..n_acts].iter().map(|v| v.as_slice()).collect();
                let mut out = [0f32; 16 * 8];
                group.throughput(Throughput::Bytes((ROWS * row_bytes) as u64));
                group.bench_function(
                    BenchmarkId::new(format!("{ty}/{isa}"), format!("{n_acts}cols")),
                    |b| {
                        b.iter(|| {
                            // Blocks of 16 rows, as the matrix product calls it.
                            for r in (0..ROWS).step_by(16) {
                                // SAFETY: the kernel was chosen for this CPU; lengths match.
                                unsafe {
                                    (k.row_dot)(
                                        &weights[r * row_bytes..(r + 16) * row_bytes],
                                        row_bytes,
                                        16,
                                        &a,
                                        Out::slice(&mut out, 16),
                                    )
                                };
                            }
                            black_box(out)
                        })
                    },
                );
            }
            // The same rows interleaved, against packed activations, where the ISA has it.
            if let Some(dot) = k.interleaved {
                let mut packed_w = vec![0u8; weights.len()];
                interleave::interleave_rows(ty, row_bytes, &weights, &mut packed_w)
                    .expect("interleavable");
                // Each token's packed row 64-byte aligned, as the matrix product lays them out.
                let size = interleave::packed_act_bytes(ty, COLS);
                let packed_a: Vec<Vec<u8>> = acts
                    .iter()
                    .map(|a| {
                        let mut p = vec![0u8; size + 64];
                        let at = p.as_ptr().align_offset(64);
                        interleave::pack_activations(ty, a, &mut p[at..at + size])
                            .expect("lengths match");
                        p
                    })
                    .collect();
                for n_acts in [1usize, 8] {
                    let a: Vec<&[u8]> = packed_a[..n_acts]
                        .iter()
                        .map(|v| &v[v.as_ptr().align_offset(64)..][..size])
                        .collect();
                    let mut out = [0f32; 16 * 8];
                    group.throughput(Throughput::Bytes((ROWS * row_bytes) as u64));
                    group.bench_function(
                        BenchmarkId::new(
                            format!("{ty}/{isa}/interleaved"),
                            format!("{n_acts}cols"),
                        ),
                        |b| {
                            b.iter(|| {
                                // Panels of 16 rows, as the matrix product calls it.
                                for r in (0..ROWS).step_by(16) {
                                    // SAFETY: the kernel was chosen for this CPU; lengths match.
                                    unsafe {
                                        dot(
                                            &packed_w[r * row_bytes..(r + 16) * row_bytes],
                                            row_bytes,
                                            16,
                                            &a,
                                            Out::slice(&mut out, 16),
                                        )
                                    };
                                }
                                black_box(out)
                            })
                        },
                    );
                }
            }
        }
    }
    group.finish();
}

fn matmuls(c: &mut Criterion) {
    let (rows, cols, tokens) = (1024, 1024, 32);
    let weights = quantized(GgmlType::Q4_K, &random_floats(rows * cols, 3));
    let x = random_floats(tokens * cols, 5);
    let mut out = vec![0f32; rows * tokens];
    let mut group = c.benchmark_group("matmul_q4k_1024x1024x32");
    group.throughput(Throughput::Elements((rows * cols * tokens) as u64));
    for precision in [Precision::Precise, Precision::Fast] {
        let compute = Compute::with_precision(Isa::detect(), 2, precision);
        let w = Weight {
            ty: GgmlType::Q4_K,
            rows,
            cols,
            data: &weights,
            layout: Layout::Gguf,
        };
        group.bench_function(format!("{precision:?}"), |b| {
            b.iter(|| {
                compute
                    .matmul(w, &x, tokens, &mut out)
                    .expect("shapes match")
            })
        });
    }
    group.finish();
}

/// One token against a weight far larger than the caches, as decoding reads it: GGUF order
/// and, where the ISA repacks, interleaved. The rate to compare with the memory's read
/// bandwidth (`bench/read_bandwidth.c`).
fn decode_stream(c: &mut Criterion) {
    decode_one_token(c, "decode_stream", 96 << 20);
}

/// The same on 1 MiB of weights, which stay in the two cores' L2 caches: the kernels' own
/// speed, which decides decoding where memory is faster than the cores.
fn decode_cached(c: &mut Criterion) {
    decode_one_token(c, "decode_cached", 1 << 20);
}

fn decode_one_token(c: &mut Criterion, name: &str, weight_bytes: usize) {
    let cols = 896;
    for ty in [GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_1] {
        let rows = weight_bytes / ty.bytes_for(cols as u64).unwrap() as usize;
        let weights = quantized(ty, &random_floats(rows * cols, 3));
        let x = random_floats(cols, 5);
        let mut out = vec![0f32; rows];
        let mut group = c.benchmark_group(format!("{name}_{ty}_{rows}x{cols}"));
        group.throughput(Throughput::Bytes(weights.len() as u64));
        group.sample_size(20);
        for isa in Isa::available() {
            let compute = Compute::with_precision(isa, 2, Precision::Fast);
            let gguf = Weight::gguf(ty, rows, cols, &weights);
            let interleaved = compute.wants_interleaved(ty).then(|| {
                let mut data = vec![0u8; weights.len()];
                compute
                    .interleave_into(gguf, &mut data)
                    .expect("interleavable");
                data
            });
            let mut layouts = vec![(Layout::Gguf, &weights)];
            if let Some(data) = &interleaved {
                layouts.push((Layout::Interleaved, data));
            }
            for (layout, data) in layouts {
                let w = Weight {
                    layout,
                    data,
                    ..gguf
                };
                group.bench_function(format!("{isa}/{layout:?}"), |b| {
                    b.iter(|| compute.matmul(w, &x, 1, &mut out).expect("shapes match"))
                });
            }
        }
        group.finish();
    }
}

/// A prompt's product on one thread: 256 tokens against Qwen's FFN shapes (gate/up for the
/// 32-element types, down for the k-quants), interleaved where the ISA repacks. Elements are
/// multiply-adds, so criterion's rate is MACs per second.
fn prefill(c: &mut Criterion) {
    let tokens = 256;
    for (ty, rows, cols) in [
        (GgmlType::Q5_0, 1024, 896),
        (GgmlType::Q8_0, 1024, 896),
        (GgmlType::Q4_K, 448, 4864),
        (GgmlType::Q6_K, 448, 4864),
    ] {
        let weights = quantized(ty, &random_floats(rows * cols, 3));
        let x = random_floats(tokens * cols, 5);
        let mut out = vec![0f32; rows * tokens];
        let mut group = c.benchmark_group(format!("prefill_{ty}_{rows}x{cols}x{tokens}"));
        group.throughput(Throughput::Elements((rows * cols * tokens) as u64));
        group.sample_size(10);
        // The scalar reference would take minutes here.
        for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
            let compute = Compute::with_precision(isa, 1, Precision::Fast);
            let gguf = Weight::gguf(ty, rows, cols, &weights);
            let mut data = weights.clone();
            let layout = if compute.wants_interleaved(ty) {
                compute
                    .interleave_into(gguf, &mut data)
                    .expect("interleavable");
                Layout::Interleaved
            } else {
                Layout::Gguf
            };
            let w = Weight {
                layout,
                data: &data,
                ..gguf
            };
            group.bench_function(format!("{isa}/{layout:?}"), |b| {
                b.iter(|| {
                    compute
                        .matmul(w, &x, tokens, &mut out)
                        .expect("shapes match")
                })
            });
        }
        group.finish();
    }
}

/// F16 weights against a few to many tokens: the fused row tiles and the strips.
fn float_tokens(c: &mut Criterion) {
    let (rows, cols) = (1024, 896);
    let weights = quantized(GgmlType::F16, &random_floats(rows * cols, 3));
    let w = Weight::gguf(GgmlType::F16, rows, cols, &weights);
    let compute = Compute::with_precision(Isa::detect(), 1, Precision::Fast);
    let mut group = c.benchmark_group(format!("f16_{rows}x{cols}"));
    group.sample_size(20);
    for tokens in [4, 6, 8, 12, 16, 24, 32, 64, 256] {
        let x = random_floats(tokens * cols, 5);
        let mut out = vec![0f32; rows * tokens];
        group.throughput(Throughput::Elements((rows * cols * tokens) as u64));
        group.bench_function(format!("{tokens}"), |b| {
            b.iter(|| {
                compute
                    .matmul(w, &x, tokens, &mut out)
                    .expect("shapes match")
            })
        });
    }
    group.finish();
}

fn pool_dispatch(c: &mut Criterion) {
    let pool = ThreadPool::new(2);
    c.bench_function("pool_dispatch_2_threads", |b| {
        b.iter(|| {
            pool.run(2, &|i| {
                black_box(i);
            })
        })
    });
}

criterion_group!(
    benches,
    row_dots,
    matmuls,
    decode_stream,
    decode_cached,
    prefill,
    float_tokens,
    pool_dispatch
);
criterion_main!(benches);
