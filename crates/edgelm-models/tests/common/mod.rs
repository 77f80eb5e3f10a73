//! Tiny random models written with edgelm's own GGUF writer, and a plain f64 reference forward
//! pass to check the crate against. The reference shares no code with edgelm-models: it is
//! written from the architectures' descriptions with naive loops, over a whole sequence at once.

#![allow(dead_code)]

use edgelm_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Llama, Arch::Qwen2, Arch::Gemma3];

    /// `general.architecture`, also the prefix of the architecture's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// The shape of a tiny model.
#[derive(Debug, Clone)]
pub struct Spec {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Gemma 3's sliding window (other architectures ignore it).
    pub window: usize,
    pub rope_base: f32,
    pub eps: f32,
}

impl Spec {
    /// Small enough for naive f64 loops, with GQA (4 query heads over 2 kv heads). Gemma 3 gets
    /// six layers so layer 5 is global, a window of 5 shorter than the test sequences, and a head
    /// size (16) that is not n_embd / n_head (8), as in real Gemma files.
    pub fn tiny(arch: Arch) -> Spec {
        let base = Spec {
            arch,
            n_layer: 2,
            n_embd: 32,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 8,
            n_ff: 64,
            n_vocab: 64,
            window: 5,
            rope_base: 10_000.0,
            eps: 1e-6,
        };
        match arch {
            Arch::Llama => base,
            Arch::Qwen2 => Spec {
                n_embd: 64,
                head_dim: 16,
                n_vocab: 96,
                rope_base: 1_000_000.0,
                ..base
            },
            Arch::Gemma3 => Spec {
                n_layer: 6,
                head_dim: 16,
                n_vocab: 80,
                rope_base: 1_000_000.0,
                ..base
            },
        }
    }

    /// Every weight row 256 wide, so every weight can be k-quantized.
    pub fn k_quantizable(arch: Arch) -> Spec {
        Spec {
            n_embd: 256,
            head_dim: 64,
            n_ff: 256,
            n_vocab: 64,
            ..Spec::tiny(arch)
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch.name())
    }
}

/// One tensor as written to the file.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    /// GGUF order: `dims[0]` is the row length (inputs), `dims[1]` the number of rows (outputs).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
    /// Row-major values the file holds, i.e. after quantization, for the reference.
    pub values: Vec<f32>,
}

impl Tensor {
    /// Store `values` as `ty`, keeping the dequantized values the file then holds.
    pub fn new(name: &str, dims: &[u64], ty: GgmlType, values: Vec<f32>) -> Tensor {
        let cols = dims[0] as usize;
        assert_eq!(
            values.len(),
            dims.iter().product::<u64>() as usize,
            "{name}"
        );
        let row_bytes = ty
            .bytes_for(cols as u64)
            .unwrap_or_else(|| panic!("{name}: {cols} not whole {ty} blocks"));
        let mut bytes = vec![0u8; row_bytes as usize * values.len() / cols];
        let mut stored = vec![0f32; values.len()];
        for ((row, out), back) in values
            .chunks(cols)
            .zip(bytes.chunks_mut(row_bytes as usize))
            .zip(stored.chunks_mut(cols))
        {
            edgelm_quant::quantize_row(ty, row, out).unwrap();
            edgelm_quant::dequantize_row(ty, out, back).unwrap();
        }
        Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            bytes,
            values: stored,
        }
    }
}

/// A deterministic generator (SplitMix64), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn tokens(&mut self, n: usize, n_vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(n_vocab) as u32).collect()
    }
}

/// A tiny model's metadata and tensors, editable before it is written (for the error tests).
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub spec: Spec,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<Tensor>,
}

impl TinyModel {
    /// All weights F32.
    pub fn random(spec: &Spec, seed: u64) -> TinyModel {
        TinyModel::random_typed(spec, seed, |_| GgmlType::F32)
    }

    /// Random weights; each matrix is stored as `ty_of(name)`, vectors as F32. Matrices are
    /// scaled by √(3/inputs) so every projection of a unit-RMS vector stays O(1), and so do
    /// attention scores and logits.
    pub fn random_typed(spec: &Spec, seed: u64, ty_of: impl Fn(&str) -> GgmlType) -> TinyModel {
        let s = spec;
        let mut rng = Rng::new(seed);
        let mut tensors = Vec::new();
        let mut matrix = |name: &str, cols: usize, rows: usize| {
            let scale = (3.0 / cols as f32).sqrt();
            let values = (0..rows * cols).map(|_| rng.uniform() * scale).collect();
            Tensor::new(name, &[cols as u64, rows as u64], ty_of(name), values)
        };
        let (d, q_dim, kv_dim) = (s.n_embd, s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        tensors.push(matrix("token_embd.weight", d, s.n_vocab));
        let mut two_d = Vec::new();
        if s.arch == Arch::Qwen2 {
            two_d.push(matrix("output.weight", d, s.n_vocab));
        }
        for i in 0..s.n_layer {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            two_d.push(matrix(&p("attn_q"), d, q_dim));
            two_d.push(matrix(&p("attn_k"), d, kv_dim));
            two_d.push(matrix(&p("attn_v"), d, kv_dim));
            two_d.push(matrix(&p("attn_output"), q_dim, d));
            two_d.push(matrix(&p("ffn_gate"), d, s.n_ff));
            two_d.push(matrix(&p("ffn_up"), d, s.n_ff));
            two_d.push(matrix(&p("ffn_down"), s.n_ff, d));
        }
        tensors.extend(two_d);

        // Norm weights near 1 and biases near 0, all distinct so a swapped one shows.
        let mut vector = |name: String, len: usize, around: f32, spread: f32| {
            let values = (0..len).map(|_| around + spread * rng.uniform()).collect();
            Tensor::new(&name, &[len as u64], GgmlType::F32, values)
        };
        tensors.push(vector("output_norm.weight".into(), d, 1.0, 0.3));
        for i in 0..s.n_layer {
            let p = |n: &str| format!("blk.{i}.{n}");
            tensors.push(vector(p("attn_norm.weight"), d, 1.0, 0.3));
            tensors.push(vector(p("ffn_norm.weight"), d, 1.0, 0.3));
            if s.arch == Arch::Qwen2 {
                tensors.push(vector(p("attn_q.bias"), q_dim, 0.0, 0.5));
                tensors.push(vector(p("attn_k.bias"), kv_dim, 0.0, 0.5));
                tensors.push(vector(p("attn_v.bias"), kv_dim, 0.0, 0.5));
            }
            if s.arch == Arch::Gemma3 {
                tensors.push(vector(p("attn_q_norm.weight"), s.head_dim, 1.0, 0.3));
                tensors.push(vector(p("attn_k_norm.weight"), s.head_dim, 1.0, 0.3));
                tensors.push(vector(p("post_attention_norm.weight"), d, 1.0, 0.3));
                tensors.push(vector(p("post_ffw_norm.weight"), d, 1.0, 0.3));
            }
        }

        let u32v = |v: usize| Value::U32(v as u32);
        let mut metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String(s.arch.name().into()),
            ),
            (s.key("block_count"), u32v(s.n_layer)),
            (s.key("context_length"), u32v(128)),
            (s.key("embedding_length"), u32v(d)),
            (s.key("feed_forward_length"), u32v(s.n_ff)),
            (s.key("attention.head_count"), u32v(s.n_head)),
            (s.key("attention.head_count_kv"), u32v(s.n_head_kv)),
            (s.key("attention.layer_norm_rms_epsilon"), Value::F32(s.eps)),
            (s.key("rope.freq_base"), Value::F32(s.rope_base)),
        ];
        match s.arch {
            Arch::Llama | Arch::Qwen2 => {
                metadata.push((s.key("rope.dimension_count"), u32v(s.head_dim)))
            }
            Arch::Gemma3 => metadata.extend([
                (s.key("attention.key_length"), u32v(s.head_dim)),
                (s.key("attention.value_length"), u32v(s.head_dim)),
                (s.key("attention.sliding_window"), u32v(s.window)),
            ]),
        }
        TinyModel {
            spec: s.clone(),
            metadata,
            tensors,
        }
    }

    pub fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }

    pub fn remove_tensor(&mut self, name: &str) {
        assert!(self.has(name), "no tensor {name}");
        self.tensors.retain(|t| t.name != name);
    }

    /// Replace a tensor by a random F32 one of other dims.
    pub fn reshape_tensor(&mut self, name: &str, dims: &[u64]) {
        let n = dims.iter().product::<u64>() as usize;
        let mut rng = Rng::new(7);
        let t = Tensor::new(
            name,
            dims,
            GgmlType::F32,
            (0..n).map(|_| rng.uniform()).collect(),
        );
        let slot = self
            .tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        *slot = t;
    }

    pub fn set_meta(&mut self, key: &str, value: Value) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.into(), value));
    }

    pub fn remove_meta(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    /// The model's GGUF bytes, through the project's writer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = GgufWriter::new();
        for (k, v) in &self.metadata {
            w.set(k, v.clone());
        }
        for t in &self.tensors {
            w.add_tensor(&t.name, &t.dims, t.ty, t.bytes.clone())
                .unwrap();
        }
        w.to_bytes()
    }

    /// The model as a GGUF file in memory, through the project's writer and reader.
    pub fn to_gguf(&self) -> Arc<GgufFile> {
        Arc::new(GgufFile::from_bytes(self.to_bytes()).unwrap())
    }

    pub fn load(&self) -> edgelm_models::Result<edgelm_models::Model> {
        edgelm_models::load(self.to_gguf())
    }
}

// ---------------------------------------------------------------------------------------------
// Reference forward pass.

/// Deliberate mistakes the reference can be asked to make, to show that the comparison with the
/// crate is sharp enough to catch each of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    None,
    /// Rotate the other architecture's pairs: (i, i+d/2) for Llama, (2i, 2i+1) otherwise.
    SwappedRopePairs,
    /// Gemma 3: attend to every earlier position in local layers too.
    NoSlidingWindow,
    /// Gemma 3: use the file's RoPE base in local layers too.
    FileRopeBaseEverywhere,
    /// Query head h reads kv head h % n_kv instead of h / (n_head / n_kv).
    InterleavedGqa,
}

/// Row-major matrix of `rows` × `cols` (`cols` = GGUF `dims[0]`).
fn matvec(t: &Tensor, x: &[f64]) -> Vec<f64> {
    let cols = t.dims[0] as usize;
    assert_eq!(x.len(), cols, "{}", t.name);
    t.values
        .chunks(cols)
        .map(|row| row.iter().zip(x).map(|(&w, &x)| w as f64 * x).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &Tensor, eps: f64) -> Vec<f64> {
    assert_eq!(x.len(), w.values.len(), "{}", w.name);
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(&w.values)
        .map(|(&x, &w)| x * r * w as f64)
        .collect()
}

/// Rotate one head in place: pair i, at angle pos·base^(-2i/d), is (2i, 2i+1) or (i, i+d/2).
fn rope(head: &mut [f64], pos: usize, base: f64, neox: bool) {
    let d = head.len();
    for i in 0..d / 2 {
        let theta = pos as f64 * base.powf(-2.0 * i as f64 / d as f64);
        let (a, b) = if neox {
            (i, i + d / 2)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * theta.cos() - x1 * theta.sin();
        head[b] = x0 * theta.sin() + x1 * theta.cos();
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// Teacher-forced logits of every position of `tokens` (one sequence starting at position 0).
pub fn reference_logits(m: &TinyModel, tokens: &[u32], flaw: Flaw) -> Vec<Vec<f64>> {
    // Qwen2 has its own output head; Llama and Gemma 3 files here tie it to the embeddings.
    let head = if m.has("output.weight") {
        m.get("output.weight")
    } else {
        m.get("token_embd.weight")
    };
    reference_hidden(m, tokens, flaw)
        .iter()
        .map(|h| matvec(head, h))
        .collect()
}

/// The final hidden state of every position after the output norm: what the head reads, and
/// what embeddings pool.
pub fn reference_hidden(m: &TinyModel, tokens: &[u32], flaw: Flaw) -> Vec<Vec<f64>> {
    let s = &m.spec;
    let gemma = s.arch == Arch::Gemma3;
    let (n, d, hd) = (tokens.len(), s.n_embd, s.head_dim);
    let eps = s.eps as f64;
    let neox = (s.arch != Arch::Llama) != (flaw == Flaw::SwappedRopePairs);
    let t = |name: String| m.get(&name);
    let linear = |name: String, x: &[f64]| {
        let mut y = matvec(m.get(&format!("{name}.weight")), x);
        if m.has(&format!("{name}.bias")) {
            y.iter_mut()
                .zip(&m.get(&format!("{name}.bias")).values)
                .for_each(|(y, &b)| *y += b as f64);
        }
        y
    };

    let embd = m.get("token_embd.weight");
    let embed_scale = if gemma { (d as f64).sqrt() } else { 1.0 };
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&tok| {
            embd.values[tok as usize * d..(tok as usize + 1) * d]
                .iter()
                .map(|&v| v as f64 * embed_scale)
                .collect()
        })
        .collect();

    for l in 0..s.n_layer {
        let p = |name: &str| format!("blk.{l}.{name}");
        // Gemma 3: every sixth layer is global with the file's base; the others slide with 10 000.
        let global = !gemma || (l + 1) % 6 == 0;
        let window = if global || flaw == Flaw::NoSlidingWindow {
            usize::MAX
        } else {
            s.window
        };
        let base = if global || flaw == Flaw::FileRopeBaseEverywhere {
            s.rope_base as f64
        } else {
            10_000.0
        };

        let mut q = Vec::new();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for (pos, xt) in x.iter().enumerate() {
            let h = rms_norm(xt, t(p("attn_norm.weight")), eps);
            let (mut qt, mut kt) = (linear(p("attn_q"), &h), linear(p("attn_k"), &h));
            if gemma {
                qt = qt
                    .chunks(hd)
                    .flat_map(|head| rms_norm(head, t(p("attn_q_norm.weight")), eps))
                    .collect();
                kt = kt
                    .chunks(hd)
                    .flat_map(|head| rms_norm(head, t(p("attn_k_norm.weight")), eps))
                    .collect();
            }
            qt.chunks_mut(hd)
                .for_each(|head| rope(head, pos, base, neox));
            kt.chunks_mut(hd)
                .for_each(|head| rope(head, pos, base, neox));
            v.push(linear(p("attn_v"), &h));
            q.push(qt);
            k.push(kt);
        }

        for pos in 0..n {
            let mut att = vec![0f64; s.n_head * hd];
            for head in 0..s.n_head {
                let kvh = if flaw == Flaw::InterleavedGqa {
                    head % s.n_head_kv
                } else {
                    head / (s.n_head / s.n_head_kv)
                };
                let qh = &q[pos][head * hd..(head + 1) * hd];
                // Causal, and within the window: keys pos-window+1 ..= pos.
                let first = (pos + 1).saturating_sub(window);
                let scores: Vec<f64> = (first..=pos)
                    .map(|j| {
                        qh.iter()
                            .zip(&k[j][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, sc) in (first..=pos).zip(&scores) {
                    let w = (sc - max).exp() / total;
                    for i in 0..hd {
                        att[head * hd + i] += w * v[j][kvh * hd + i];
                    }
                }
            }
            let mut o = linear(p("attn_output"), &att);
            if gemma {
                o = rms_norm(&o, t(p("post_attention_norm.weight")), eps);
            }
            x[pos].iter_mut().zip(&o).for_each(|(x, o)| *x += o);

            let h = rms_norm(&x[pos], t(p("ffn_norm.weight")), eps);
            let (g, u) = (linear(p("ffn_gate"), &h), linear(p("ffn_up"), &h));
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| if gemma { gelu_tanh(g) * u } else { silu(g) * u })
                .collect();
            let mut o = linear(p("ffn_down"), &act);
            if gemma {
                o = rms_norm(&o, t(p("post_ffw_norm.weight")), eps);
            }
            x[pos].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
    }

    x.iter()
        .map(|xt| rms_norm(xt, m.get("output_norm.weight"), eps))
        .collect()
}
