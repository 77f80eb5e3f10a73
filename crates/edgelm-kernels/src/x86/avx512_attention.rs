//! 512-bit attention tiles over f16 key/value rows (the fast path's cache): the same tiles as
//! `avx2::tile_f16` / `avx2::weighted_rows_f16` on sixteen lanes, F16C conversions to 512 bits.

use std::arch::x86_64::*;

/// `out[r][t] = Σ_i w[r][i] · x[t][i]` over `k` values: `R` f16 key rows by `T` f32 query rows.
///
/// # Safety
/// The CPU supports AVX-512 F; every pointer is valid for `k` elements.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn tile_f16<const R: usize, const T: usize>(
    w: &[*const u16; R],
    x: &[*const f32; T],
    k: usize,
    out: &mut [[f32; T]; R],
) {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let k16 = k / 16 * 16;
    let mut i = 0;
    while i < k16 {
        let mut xv = [_mm512_setzero_ps(); T];
        for t in 0..T {
            xv[t] = _mm512_loadu_ps(x[t].add(i));
        }
        for r in 0..R {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w[r].add(i).cast()));
            for t in 0..T {
                acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
        i += 16;
    }
    for r in 0..R {
        for t in 0..T {
            let mut s = _mm512_reduce_add_ps(acc[r][t]);
            for j in k16..k {
                s += half::f16::from_bits(*w[r].add(j)).to_f32() * *x[t].add(j);
            }
            out[r][t] = s;
        }
    }
}

/// `out[r] += Σ_j p[r][j] · v[j]` over f16 value rows of `hd` elements, 32 columns at a time.
///
/// # Safety
/// The CPU supports AVX-512 F; `hd` is a multiple of 32; `p[r]` holds `v.len()` weights and
/// every row and output `hd` elements.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn weighted_rows_f16<const R: usize>(
    p: &[*const f32; R],
    v: &[*const u16],
    hd: usize,
    out: &[*mut f32; R],
) {
    let mut d = 0;
    while d + 32 <= hd {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (j, vj) in v.iter().enumerate() {
            let v0 = _mm512_cvtph_ps(_mm256_loadu_si256(vj.add(d).cast()));
            let v1 = _mm512_cvtph_ps(_mm256_loadu_si256(vj.add(d + 16).cast()));
            for r in 0..R {
                let w = _mm512_set1_ps(*p[r].add(j));
                acc[r][0] = _mm512_fmadd_ps(w, v0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w, v1, acc[r][1]);
            }
        }
        for r in 0..R {
            let o = out[r].add(d);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[r][0]));
            _mm512_storeu_ps(
                o.add(16),
                _mm512_add_ps(_mm512_loadu_ps(o.add(16)), acc[r][1]),
            );
        }
        d += 32;
    }
}
