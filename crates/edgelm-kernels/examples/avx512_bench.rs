use edgelm_kernels::qdot::kernel_for;
use edgelm_kernels::Isa;
use edgelm_quant::{int_dot, quantize_row, GgmlType};
use std::time::Instant;

fn main() {
    let k = 4096usize;
    let rows = 32usize;
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    use GgmlType::*;
    for ty in [Q4_K, Q6_K, Q8_0, Q5_0, Q4_1, Q4_0, Q5_K, Q5_1, Q3_K, Q2_K] {
        let rb = ty.bytes_for(k as u64).unwrap() as usize;
        let mut w = vec![0u8; rows * rb];
        for r in 0..rows {
            let x: Vec<f32> = (0..k).map(|_| rnd()).collect();
            quantize_row(ty, &x, &mut w[r * rb..(r + 1) * rb]).unwrap();
        }
        let act = int_dot::activation_type(ty);
        let ab = act.bytes_for(k as u64).unwrap() as usize;
        let acts: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                let x: Vec<f32> = (0..k).map(|_| rnd()).collect();
                let mut a = vec![0u8; ab];
                quantize_row(act, &x, &mut a).unwrap();
                a
            })
            .collect();
        let nb = k / ty.block_elems();
        let mut line = format!("{:5}", format!("{ty:?}"));
        for n in [1usize, 8] {
            let refs: Vec<&[u8]> = acts[..n].iter().map(|a| &a[..]).collect();
            let mut res = vec![];
            for isa in [Isa::Avx2, Isa::Avx512] {
                let kern = kernel_for(isa, ty).unwrap();
                let mut out = [0f32; 8];
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let iters = 40;
                    let t = Instant::now();
                    for _ in 0..iters {
                        for r in 0..rows {
                            unsafe { (kern.row_dot)(&w[r * rb..(r + 1) * rb], &refs, &mut out[..n]) };
                        }
                        std::hint::black_box(&out);
                    }
                    let ns = t.elapsed().as_secs_f64() * 1e9 / (iters * rows * nb * n) as f64;
                    best = best.min(ns);
                }
                res.push((kern.isa, best));
            }
            line += &format!(
                " | N={n}: avx2 {:6.2} ({}) avx512 {:6.2} ({}) x{:.2}",
                res[0].1, res[0].0, res[1].1, res[1].0, res[0].1 / res[1].1
            );
        }
        println!("{line}   ns/block/row");
    }
}
