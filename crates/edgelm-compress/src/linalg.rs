//! Symmetric eigendecomposition for the low-rank factoring: Householder reduction to
//! tridiagonal form, then the implicit QL iteration with Wilkinson-style shifts (the EISPACK
//! tred2/tql2 pair, written from its description). O(n³) in f64; n is a model's hidden size.

/// Eigenvalues (descending) and eigenvectors of the symmetric `n`×`n` row-major matrix `a`:
/// vector k is `vectors[k * n..(k + 1) * n]`.
pub struct Eigen {
    pub values: Vec<f64>,
    pub vectors: Vec<f64>,
}

pub fn symmetric_eigen(a: &[f64], n: usize) -> Eigen {
    assert_eq!(a.len(), n * n, "a square matrix");
    if n == 0 {
        return Eigen {
            values: Vec::new(),
            vectors: Vec::new(),
        };
    }
    let mut v = a.to_vec();
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    tridiagonalize(&mut v, n, &mut d, &mut e);
    // The QL sweeps rotate columns of V; rotating rows of Vᵀ instead keeps them contiguous.
    let mut vt = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            vt[j * n + i] = v[i * n + j];
        }
    }
    diagonalize(&mut vt, n, &mut d, &mut e);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| d[y].total_cmp(&d[x]));
    let values = order.iter().map(|&k| d[k]).collect();
    let mut vectors = Vec::with_capacity(n * n);
    for &k in &order {
        vectors.extend_from_slice(&vt[k * n..(k + 1) * n]);
    }
    Eigen { values, vectors }
}

/// Householder reduction of the symmetric `v` to tridiagonal form: `d` gets the diagonal, `e`
/// the subdiagonal (e[0] = 0), `v` the orthogonal transformation.
fn tridiagonalize(v: &mut [f64], n: usize, d: &mut [f64], e: &mut [f64]) {
    let at = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
    }
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
                v[at(j, i)] = 0.0;
            }
        } else {
            for x in &mut d[..i] {
                *x /= scale;
                h += *x * *x;
            }
            let f = d[i - 1];
            let g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].iter_mut().for_each(|x| *x = 0.0);
            for j in 0..i {
                let f = d[j];
                v[at(j, i)] = f;
                let mut g = e[j] + v[at(j, j)] * f;
                for k in j + 1..i {
                    g += v[at(k, j)] * d[k];
                    e[k] += v[at(k, j)] * f;
                }
                e[j] = g;
            }
            let mut f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                for k in j..i {
                    v[at(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v[at(n - 1, i)] = v[at(i, i)];
        v[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[at(k, i + 1)] / h;
            }
            for j in 0..=i {
                let g: f64 = (0..=i).map(|k| v[at(k, i + 1)] * v[at(k, j)]).sum();
                for k in 0..=i {
                    v[at(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[at(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
        v[at(n - 1, j)] = 0.0;
    }
    v[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL on the tridiagonal (`d`, `e`), rotating the rows of `vt` (the transposed
/// transformation) along; `d` ends holding the eigenvalues, row k of `vt` vector k.
fn diagonalize(vt: &mut [f64], n: usize, d: &mut [f64], e: &mut [f64]) {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            // 30 iterations per eigenvalue is ample; the bound only guards against NaN input.
            for _ in 0..60 {
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let h = g - d[l];
                for x in &mut d[l + 2..n] {
                    *x -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    let h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = vt.split_at_mut((i + 1) * n);
                    let (vi, vi1) = (&mut lo[i * n..], &mut hi[..n]);
                    for (a, b) in vi.iter_mut().zip(vi1.iter_mut()) {
                        let h = *b;
                        *b = s * *a + c * h;
                        *a = c * *a - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_symmetric(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let x = next();
                a[i * n + j] = x;
                a[j * n + i] = x;
            }
        }
        a
    }

    #[test]
    fn eigenpairs_satisfy_the_definition_and_are_orthonormal() {
        for (n, seed) in [(1, 1), (2, 2), (7, 3), (40, 4), (97, 5)] {
            let a = random_symmetric(n, seed);
            let Eigen { values, vectors } = symmetric_eigen(&a, n);
            assert!(values.windows(2).all(|w| w[0] >= w[1]), "descending");
            for k in 0..n {
                let v = &vectors[k * n..(k + 1) * n];
                for i in 0..n {
                    let av: f64 = (0..n).map(|j| a[i * n + j] * v[j]).sum();
                    assert!((av - values[k] * v[i]).abs() < 1e-10, "n {n} pair {k}");
                }
                for l in 0..n {
                    let dot: f64 = v
                        .iter()
                        .zip(&vectors[l * n..(l + 1) * n])
                        .map(|(x, y)| x * y)
                        .sum();
                    let want = if k == l { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-10, "n {n} vectors {k}·{l} = {dot}");
                }
            }
        }
    }

    #[test]
    fn repeated_and_zero_eigenvalues() {
        // diag(3, 3, 0, -1) rotated is still found exactly.
        let n = 4;
        let mut a = vec![0f64; 16];
        for (i, x) in [3.0, 3.0, 0.0, -1.0].into_iter().enumerate() {
            a[i * n + i] = x;
        }
        let e = symmetric_eigen(&a, n);
        for (got, want) in e.values.iter().zip([3.0, 3.0, 0.0, -1.0]) {
            assert!((got - want).abs() < 1e-12, "{:?}", e.values);
        }
    }
}
