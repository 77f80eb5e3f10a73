//! Whole-file quantization on small GGUF files written here.

use crate::imatrix::Imatrix;
use crate::mix::{FileType, Overrides};
use crate::quantize::{quantize, QuantizeOptions};
use edgelm_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use std::path::PathBuf;

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn normal(&mut self) -> f32 {
        let mut s = 0f32;
        for _ in 0..12 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            s += (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        }
        s - 6.0
    }
}

/// A two-layer model-shaped file: rows of 512 (k-quants fit) and an embedding of 96 (they
/// do not), F32 and F16 sources, norms and a bias to copy.
fn source(nan_in: Option<&str>) -> GgufFile {
    let mut rng = Rng(42);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(2));
    w.set("llama.attention.head_count", Value::U32(8));
    w.set("llama.attention.head_count_kv", Value::U32(2));
    let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64], ty: GgmlType| {
        let n: u64 = dims.iter().product();
        let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 0.05).collect();
        if nan_in == Some(name) {
            x[3] = f32::NAN;
        }
        let mut data = vec![0u8; ty.bytes_for(n).expect("whole blocks") as usize];
        edgelm_quant::quantize_row(ty, &x, &mut data).expect("encode");
        w.add_tensor(name, dims, ty, data).expect("add");
    };
    add(&mut w, "token_embd.weight", &[96, 40], GgmlType::F16);
    for l in 0..2 {
        add(
            &mut w,
            &format!("blk.{l}.attn_norm.weight"),
            &[512],
            GgmlType::F32,
        );
        add(
            &mut w,
            &format!("blk.{l}.attn_q.weight"),
            &[512, 64],
            GgmlType::F32,
        );
        add(
            &mut w,
            &format!("blk.{l}.attn_q.bias"),
            &[64],
            GgmlType::F32,
        );
        add(
            &mut w,
            &format!("blk.{l}.attn_v.weight"),
            &[512, 32],
            GgmlType::F16,
        );
        add(
            &mut w,
            &format!("blk.{l}.ffn_down.weight"),
            &[512, 48],
            GgmlType::F32,
        );
    }
    GgufFile::from_bytes(w.to_bytes()).expect("parse")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgelm-compress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn options(ft: FileType) -> QuantizeOptions<'static> {
    QuantizeOptions {
        file_type: ft,
        imatrix: None,
        imatrix_name: None,
        moments: None,
        moments_name: None,
        tensor_types: Vec::new(),
        overrides: Overrides::default(),
        threads: 2,
    }
}

fn tensor_f32(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).expect("tensor");
    let n: u64 = t.dims().iter().product();
    let mut out = vec![0f32; n as usize];
    edgelm_quant::dequantize_row(t.ty(), t.data, &mut out).expect("decode");
    out
}

fn rel_rmse(a: &[f32], b: &[f32]) -> f32 {
    let e: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let s: f32 = a.iter().map(|x| x * x).sum();
    (e / s).sqrt()
}

/// Every file type writes a file that parses, carries its file type, types every weight as
/// planned, copies what it does not convert byte for byte, and reproduces the weights within
/// the type's error.
#[test]
fn every_file_type_round_trips() {
    let src = source(None);
    for ft in FileType::ALL {
        let path = scratch(&format!("{}.gguf", ft.name()));
        let mut calls = 0;
        let summary = quantize(&src, &path, &options(ft), &mut |_| {
            calls += 1;
            true
        })
        .expect("quantize");
        assert!(calls >= src.tensors().len() * 2, "{ft:?}: progress");
        let out = GgufFile::open(&path).expect("output parses");
        assert_eq!(out.get_u64("general.file_type"), Some(ft.id() as u64));
        assert_eq!(out.tensors().len(), src.tensors().len());
        for t in src.tensors() {
            let o = out.tensor(&t.name).expect("tensor kept");
            assert_eq!(o.dims(), &t.dims[..], "{}", t.name);
            if !crate::mix::is_quantizable(&t.name, t.dims.len()) {
                assert_eq!(o.ty(), t.ty, "{}", t.name);
                assert_eq!(o.data, src.tensor(&t.name).expect("src").data, "{}", t.name);
                continue;
            }
            let bound = match o.ty() {
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 => 0.01,
                GgmlType::Q6_K => 0.03,
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 0.05,
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 0.1,
                GgmlType::IQ4_NL | GgmlType::IQ4_XS => 0.1,
                GgmlType::Q3_K => 0.2,
                GgmlType::Q2_K => 0.4,
                other => panic!("{ft:?} wrote {other} for {}", t.name),
            };
            let e = rel_rmse(&tensor_f32(&src, &t.name), &tensor_f32(&out, &t.name));
            assert!(e < bound, "{ft:?} {} as {}: {e}", t.name, o.ty());
        }
        assert!(summary.bits_per_weight() > 2.0, "{ft:?}");
        std::fs::remove_file(&path).expect("cleanup");
    }
}

fn planned_type(plan: &crate::quantize::Plan, name: &str) -> GgmlType {
    plan.tensors
        .iter()
        .find(|(p, _)| p.name == name)
        .map(|(p, _)| p.to)
        .expect("planned")
}

/// Q4_K_M's mix: the tied 96-wide table Q8_0, one of the two layers' ffn_down (the last eighth
/// by position; see the next test) Q6_K and the other Q4_K; a `--tensor-type` pattern wins over
/// the rules.
#[test]
fn mix_rules_and_patterns_choose_types() {
    let src = source(None);
    let mut o = options(FileType::Q4_K_M);
    let plan = crate::quantize::plan(&src, &o).expect("plan");
    let ty = |name: &str| planned_type(&plan, name);
    assert_eq!(ty("token_embd.weight"), GgmlType::Q8_0);
    let mut down = [ty("blk.0.ffn_down.weight"), ty("blk.1.ffn_down.weight")];
    down.sort_by_key(|t| t.name());
    assert_eq!(down, [GgmlType::Q4_K, GgmlType::Q6_K]);
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q4_K);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
    o.tensor_types = vec![(
        fancy_regex::Regex::new(r"attn_q\.weight$").expect("regex"),
        GgmlType::Q8_0,
    )];
    let plan = crate::quantize::plan(&src, &o).expect("plan");
    assert!(plan
        .tensors
        .iter()
        .filter(|(p, _)| p.name.ends_with("attn_q.weight"))
        .all(|(p, _)| p.to == GgmlType::Q8_0));
}

/// A mix's extra bits go to the layer that loses the most without them: with one layer's
/// ffn_down already on Q4_K's grid (as in a file written from a Q4_K_M one) the other gets
/// Q6_K, whichever position says; the file's size stays the same.
#[test]
fn extra_bits_go_where_rounding_loses_most() {
    for on_grid in [0usize, 1] {
        let mut rng = Rng(7);
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("llama".into()));
        w.set("llama.block_count", Value::U32(2));
        for l in 0..2 {
            let mut x: Vec<f32> = (0..512 * 48).map(|_| rng.normal() * 0.05).collect();
            if l == on_grid {
                let n = x.len() as u64;
                let mut q = vec![0u8; GgmlType::Q4_K.bytes_for(n).expect("blocks") as usize];
                edgelm_quant::quantize_row(GgmlType::Q4_K, &x, &mut q).expect("encode");
                edgelm_quant::dequantize_row(GgmlType::Q4_K, &q, &mut x).expect("decode");
            }
            let bytes = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            let name = format!("blk.{l}.ffn_down.weight");
            w.add_tensor(&name, &[512, 48], GgmlType::F32, bytes)
                .expect("add");
        }
        let src = GgufFile::from_bytes(w.to_bytes()).expect("parse");
        let plan = crate::quantize::plan(&src, &options(FileType::Q4_K_M)).expect("plan");
        let other = 1 - on_grid;
        let name = |l: usize| format!("blk.{l}.ffn_down.weight");
        assert_eq!(planned_type(&plan, &name(other)), GgmlType::Q6_K);
        assert_eq!(planned_type(&plan, &name(on_grid)), GgmlType::Q4_K);
        assert_eq!(
            plan.placements,
            vec![crate::quantize::Placement {
                role: "ffn_down.weight".into(),
                to: GgmlType::Q6_K,
                usual: GgmlType::Q4_K,
                layers: vec![other],
                by_position: vec![1],
            }]
        );
    }
}

/// An importance matrix moves the error onto the columns that matter: the error weighted by
/// the true input statistics falls.
#[test]
fn importance_lowers_the_weighted_error() {
    let src = source(None);
    let name = "blk.1.ffn_down.weight";
    // Inputs whose first columns are far louder than the rest.
    let mut m = Imatrix::default();
    let cols = 512;
    let act: Vec<f32> = (0..cols)
        .map(|j| if j % 32 < 4 { 30.0 } else { 0.1 })
        .collect();
    m.accumulate(name, &act, cols, 1);
    let imp = m.importance(name).expect("entry");
    let weighted_error = |with: Option<&Imatrix>| {
        let mut o = options(FileType::Q4_0);
        o.imatrix = with;
        let path = scratch(&format!("imp-{}.gguf", with.is_some()));
        quantize(&src, &path, &o, &mut |_| true).expect("quantize");
        let out = GgufFile::open(&path).expect("parse");
        let (a, b) = (tensor_f32(&src, name), tensor_f32(&out, name));
        std::fs::remove_file(&path).expect("cleanup");
        a.iter()
            .zip(&b)
            .enumerate()
            .map(|(i, (x, y))| imp[i % cols] * (x - y).powi(2))
            .sum::<f32>()
    };
    let (plain, weighted) = (weighted_error(None), weighted_error(Some(&m)));
    assert!(
        weighted < plain * 0.8,
        "with imatrix {weighted}, without {plain}"
    );
}

/// A failure midway (a NaN in the last tensor) is an error naming the tensor, and leaves
/// neither the output nor its temporary file; an existing file under the name is untouched.
#[test]
fn failure_leaves_no_file() {
    let src = source(Some("blk.1.ffn_down.weight"));
    let path = scratch("failed.gguf");
    let e = quantize(&src, &path, &options(FileType::Q4_0), &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("blk.1.ffn_down.weight"), "{e}");
    assert!(!path.exists());
    assert!(!crate::temporary_name(&path).exists());
    std::fs::write(&path, b"keep me").expect("write");
    assert!(quantize(&src, &path, &options(FileType::Q4_0), &mut |_| true).is_err());
    assert_eq!(std::fs::read(&path).expect("read"), b"keep me");
    std::fs::remove_file(&path).expect("cleanup");
}

/// An importance matrix made for another model (other row lengths) is refused by name.
#[test]
fn foreign_imatrix_is_refused() {
    let src = source(None);
    let mut m = Imatrix::default();
    m.accumulate("blk.0.attn_q.weight", &[1.0; 8], 8, 1);
    let mut o = options(FileType::Q4_0);
    o.imatrix = Some(&m);
    let path = scratch("foreign.gguf");
    let e = quantize(&src, &path, &o, &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("another model"), "{e}");
    assert!(!path.exists());
}

/// Stopping midway (as Ctrl-C does through the progress callback) writes nothing.
#[test]
fn interrupted_run_writes_nothing() {
    let src = source(None);
    let path = scratch("interrupted.gguf");
    let mut seen = 0;
    let e = quantize(&src, &path, &options(FileType::Q4_K_M), &mut |_| {
        seen += 1;
        seen < 5
    })
    .unwrap_err();
    assert!(matches!(e, crate::CompressError::Interrupted), "{e}");
    assert!(!path.exists() && !crate::temporary_name(&path).exists());
}

/// A writer that fails or panics midway leaves neither the output nor its temporary file.
#[test]
fn failed_or_panicking_writes_leave_nothing() {
    use std::io::Write;
    let path = scratch("panicked.gguf");
    let e = crate::write_atomically(&path, |f| {
        f.write_all(b"GGUF").expect("write");
        Err(crate::CompressError::Interrupted)
    });
    assert!(e.is_err());
    assert!(!path.exists() && !crate::temporary_name(&path).exists());
    let unwound = std::panic::catch_unwind(|| {
        crate::write_atomically(&path, |f| {
            f.write_all(b"GGUF").expect("write");
            panic!("a bug midway");
        })
    });
    assert!(unwound.is_err());
    assert!(!path.exists() && !crate::temporary_name(&path).exists());
}

/// Inputs of `cols` columns driven by a few shared factors (correlated, as a layer's are), `tokens`
/// rows of them.
pub(crate) fn correlated_inputs(rng: &mut Rng, tokens: usize, cols: usize) -> Vec<f32> {
    let factors = 8;
    let mix: Vec<f32> = (0..factors * cols).map(|_| rng.normal()).collect();
    let mut x = vec![0f32; tokens * cols];
    for t in 0..tokens {
        let f: Vec<f32> = (0..factors).map(|_| rng.normal()).collect();
        for j in 0..cols {
            let shared: f32 = (0..factors).map(|k| f[k] * mix[k * cols + j]).sum();
            x[t * cols + j] = shared + 0.2 * rng.normal();
        }
    }
    x
}

/// The SIMD f32 product of a chunk, added to the lower triangle and then mirrored, equals the
/// direct f64 sum of outer products.
#[test]
fn second_moments_match_a_direct_sum() {
    let mut rng = Rng(3);
    // Wider than one band of rows, and not a whole number of them.
    let (tokens, cols) = (37, 600);
    let x = correlated_inputs(&mut rng, tokens, cols);
    let compute = edgelm_kernels::Compute::precise(edgelm_kernels::Isa::detect(), 2);
    let mut sum = vec![1f32; cols * cols];
    crate::lowrank::add_second_moments(&compute, &mut sum, &x, cols, tokens).expect("adds");
    crate::lowrank::mirror_lower(&mut sum, cols);
    for i in 0..cols {
        for j in 0..cols {
            let want: f64 = 1.0
                + (0..tokens)
                    .map(|t| x[t * cols + i] as f64 * x[t * cols + j] as f64)
                    .sum::<f64>();
            let got = sum[i * cols + j] as f64;
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "({i},{j}): {got} against {want}"
            );
        }
    }
    assert!(crate::lowrank::add_second_moments(&compute, &mut sum, &x, cols + 1, tokens).is_err());
}

/// With the calibration inputs' moments every weight matrix is fed back, and its output error
/// on those inputs, (w − q)ᵀ·H·(w − q), falls well below that of importance-weighted rounding
/// alone; the token embedding table is not a projection and is left to plain rounding.
#[test]
fn feedback_lowers_the_output_error_of_a_file() {
    use crate::lowrank::{Moments, SecondMoments};
    let src = source(None);
    let mut rng = Rng(9);
    let cols = 512;
    let x = correlated_inputs(&mut rng, 1024, cols);
    let mut h = vec![0f32; cols * cols];
    let compute = edgelm_kernels::Compute::precise(edgelm_kernels::Isa::detect(), 2);
    crate::lowrank::add_second_moments(&compute, &mut h, &x, cols, 1024).expect("adds");
    crate::lowrank::mirror_lower(&mut h, cols);
    let h = std::sync::Arc::new(h);
    let mut moments = Moments::new();
    let mut m = Imatrix::default();
    for l in 0..2 {
        for role in ["attn_q", "attn_v", "ffn_down"] {
            let name = format!("blk.{l}.{role}.weight");
            moments.insert(name.clone(), SecondMoments::Inputs(h.clone()));
            m.accumulate(&name, &x, cols, 1024);
        }
    }
    // Importance alone: input means would make the baseline a rounding that sees more.
    m.entries.values_mut().for_each(|e| e.input_sums.clear());
    let output_error = |with: Option<&Moments>| {
        let mut o = options(FileType::Q4_0);
        o.imatrix = Some(&m);
        o.moments = with.map(|m| m as &dyn crate::quantize::MomentSource);
        let path = scratch(&format!("feedback-{}.gguf", with.is_some()));
        let summary = quantize(&src, &path, &o, &mut |_| true).expect("quantize");
        assert_eq!(summary.fed_back, if with.is_some() { 6 } else { 0 });
        let out = GgufFile::open(&path).expect("parse");
        let mut total = 0f64;
        for name in moments.keys() {
            let (a, b) = (tensor_f32(&src, name), tensor_f32(&out, name));
            for (ra, rb) in a.chunks_exact(cols).zip(b.chunks_exact(cols)) {
                let d: Vec<f64> = ra.iter().zip(rb).map(|(p, q)| (p - q) as f64).collect();
                for i in 0..cols {
                    let hd: f64 = (0..cols).map(|j| h[i * cols + j] as f64 * d[j]).sum();
                    total += d[i] * hd;
                }
            }
        }
        std::fs::remove_file(&path).expect("cleanup");
        total
    };
    let (plain, fed) = (output_error(None), output_error(Some(&moments)));
    assert!(
        fed < 0.7 * plain,
        "fed back {fed}, importance alone {plain}"
    );
}

/// Inputs that share an offset add up a row's rounding errors along it in every token: an
/// importance matrix with input sums lets the rounding see that, and the output error on those
/// inputs falls well below what the same squared sums alone give, with no calibration pass.
#[test]
fn input_means_lower_the_output_error_of_a_file() {
    let src = source(None);
    let mut rng = Rng(11);
    let (cols, tokens) = (512, 1024);
    let offset: Vec<f32> = (0..cols).map(|_| 1.5 * rng.normal()).collect();
    let mut x = correlated_inputs(&mut rng, tokens, cols);
    for row in x.chunks_exact_mut(cols) {
        row.iter_mut()
            .zip(&offset)
            .for_each(|(v, o)| *v = 0.3 * *v + o);
    }
    let names: Vec<String> = (0..2)
        .flat_map(|l| ["attn_q", "attn_v", "ffn_down"].map(|r| format!("blk.{l}.{r}.weight")))
        .collect();
    let mut with = Imatrix::default();
    for name in &names {
        with.accumulate(name, &x, cols, tokens);
    }
    let mut without = with.clone();
    without
        .entries
        .values_mut()
        .for_each(|e| e.input_sums.clear());
    let output_error = |m: &Imatrix, label: &str| {
        let mut o = options(FileType::Q4_0);
        o.imatrix = Some(m);
        let path = scratch(&format!("means-{label}.gguf"));
        let summary = quantize(&src, &path, &o, &mut |_| true).expect("quantize");
        let aware = m.entries.values().any(|e| !e.input_sums.is_empty());
        assert_eq!(summary.mean_aware, if aware { names.len() } else { 0 });
        assert_eq!(summary.fed_back, 0);
        let out = GgufFile::open(&path).expect("parse");
        let mut total = 0f64;
        for name in &names {
            let (a, b) = (tensor_f32(&src, name), tensor_f32(&out, name));
            for (ra, rb) in a.chunks_exact(cols).zip(b.chunks_exact(cols)) {
                for xt in x.chunks_exact(cols) {
                    let y: f64 = ra
                        .iter()
                        .zip(rb)
                        .zip(xt)
                        .map(|((p, q), v)| ((p - q) * v) as f64)
                        .sum();
                    total += y * y;
                }
            }
        }
        std::fs::remove_file(&path).expect("cleanup");
        total
    };
    let (plain, aware) = (
        output_error(&without, "plain"),
        output_error(&with, "aware"),
    );
    assert!(
        aware < 0.8 * plain,
        "with input means {aware}, squared sums alone {plain}"
    );
}

/// An importance matrix whose input sums are not finite is refused by name, and no file is
/// left under the output's name.
#[test]
fn non_finite_input_means_are_refused_by_name() {
    let src = source(None);
    let mut rng = Rng(12);
    let (cols, tokens) = (512, 64);
    let x = correlated_inputs(&mut rng, tokens, cols);
    let mut m = Imatrix::default();
    m.accumulate("blk.0.attn_q.weight", &x, cols, tokens);
    if let Some(e) = m.entries.get_mut("blk.0.attn_q.weight") {
        e.input_sums[5] = f32::NAN;
    }
    let mut o = options(FileType::Q4_0);
    o.imatrix = Some(&m);
    let path = scratch("means-nan.gguf");
    let err = quantize(&src, &path, &o, &mut |_| true).expect_err("refused");
    let text = err.to_string();
    assert!(
        matches!(err, crate::CompressError::BadImatrix { .. })
            && text.contains("blk.0.attn_q.weight"),
        "{text}"
    );
    assert!(!path.exists());
}
