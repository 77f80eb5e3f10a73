//! Error feedback's costs at the sizes of a 0.5B model's widest input (Qwen2.5's ffn_down,
//! 4864 columns) and its usual one (896): the factorization of the input moments, feeding back
//! 1024 rows of Q4_0, and the same rows on one thread by the closed form an importance matrix's
//! input means allow (`cargo bench -p edgelm-compress`; elements are rows).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgelm_compress::gptq::{Compensator, MeanFeedback};
use edgelm_gguf::GgmlType;
use edgelm_kernels::{Compute, Isa};
use std::hint::black_box;

/// Moments of inputs with a shared component, so the factor is not just diagonal.
fn moments(cols: usize) -> Vec<f32> {
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        for j in 0..cols {
            let shared = 0.5 / (1.0 + (i as f32 - j as f32).abs());
            h[i * cols + j] = shared + if i == j { 1.0 + (i % 7) as f32 } else { 0.0 };
        }
    }
    h
}

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

fn feedback(c: &mut Criterion) {
    let compute = Compute::precise(Isa::detect(), edgelm_kernels::physical_cores());
    let mut g = c.benchmark_group("feedback");
    g.sample_size(10);
    for cols in [896, 4864] {
        let h = moments(cols);
        g.throughput(Throughput::Elements(cols as u64));
        g.bench_with_input(BenchmarkId::new("factor", cols), &h, |b, h| {
            b.iter(|| Compensator::new(black_box(h), cols, &compute).expect("definite"))
        });
        let comp = Compensator::new(&h, cols, &compute).expect("definite");
        let rows = 1024;
        let w = random_floats(rows * cols, 7);
        let weights = vec![1f32; rows * cols];
        let ty = GgmlType::Q4_0;
        let mut out = vec![0u8; rows * cols / 32 * 18];
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_function(BenchmarkId::new("q4_0_rows", cols), |b| {
            b.iter(|| {
                let mut work = w.clone();
                comp.quantize_rows(&compute, ty, &mut work, &weights, &mut out)
                    .expect("quantizes")
            })
        });
        let importance: Vec<f32> = (0..cols).map(|i| 1.5 + (i % 7) as f32).collect();
        let means: Vec<f32> = random_floats(cols, 11);
        let closed = MeanFeedback::new(&importance, &means).expect("consistent");
        let row_bytes = cols / 32 * 18;
        g.bench_function(BenchmarkId::new("q4_0_rows_means", cols), |b| {
            b.iter(|| {
                let mut work = w.clone();
                for (row, dst) in work
                    .chunks_exact_mut(cols)
                    .zip(out.chunks_exact_mut(row_bytes))
                {
                    closed
                        .quantize_row(ty, row, &weights[..cols], dst)
                        .expect("quantizes");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, feedback);
criterion_main!(benches);
