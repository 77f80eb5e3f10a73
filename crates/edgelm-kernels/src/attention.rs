//! Softmax attention of the query heads that share one key/value head (grouped-query
//! attention): each key and value row is fetched once and used by every head of the group.
//! Keys and values are read in the cache's own types — f32, f16, or Q8_0/Q4_0 blocks
//! dequantized in registers — never through a widened copy of the cache.

use crate::{Compute, Isa};

/// 32 cached values as Q8_0 (f16 scale `d`, 32 i8; `x = q·d`), ggml's block layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct BlockQ8_0(pub [u8; 34]);

/// 32 cached values as Q4_0 (f16 scale `d`, 16 bytes of nibbles; `x = (q − 8)·d`; byte `j`
/// holds value `j` low and `j + 16` high), ggml's block layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct BlockQ4_0(pub [u8; 18]);

/// Values per quantized block.
pub const KV_BLOCK: usize = 32;

/// Cached keys or values of one layer from one kv head's first column on, as the cache stores
/// them.
#[derive(Clone, Copy, Debug)]
pub enum KvPlane<'a> {
    F32(&'a [f32]),
    /// f16 bit patterns.
    F16(&'a [u16]),
    Q8_0(&'a [BlockQ8_0]),
    Q4_0(&'a [BlockQ4_0]),
}

/// An element type of cached keys and values: one value, or one block of [`KV_BLOCK`].
trait KvElem: Copy + 'static {
    /// Values per element.
    const PER: usize;
    fn of(plane: KvPlane<'_>) -> Option<&[Self]>;
    /// Scalar `k · q` over `q.len()` values (the reference order).
    fn dot(k: &[Self], q: &[f32]) -> f32;
    /// Scalar `out += w · v` over `out.len()` values.
    fn add_scaled(v: &[Self], w: f32, out: &mut [f32]);
}

impl KvElem for f32 {
    const PER: usize = 1;
    fn of(plane: KvPlane<'_>) -> Option<&[f32]> {
        match plane {
            KvPlane::F32(x) => Some(x),
            _ => None,
        }
    }
    fn dot(k: &[f32], q: &[f32]) -> f32 {
        crate::compute::scalar_dot(&k[..q.len()], q)
    }
    fn add_scaled(v: &[f32], w: f32, out: &mut [f32]) {
        out.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
}

impl KvElem for u16 {
    const PER: usize = 1;
    fn of(plane: KvPlane<'_>) -> Option<&[u16]> {
        match plane {
            KvPlane::F16(x) => Some(x),
            _ => None,
        }
    }
    fn dot(k: &[u16], q: &[f32]) -> f32 {
        k.iter().zip(q).map(|(k, q)| f16(*k) * q).sum()
    }
    fn add_scaled(v: &[u16], w: f32, out: &mut [f32]) {
        out.iter_mut().zip(v).for_each(|(o, v)| *o += w * f16(*v));
    }
}

pub(crate) fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// A block's scale and its 32 integer levels.
pub(crate) fn levels<B: QuantBlock>(b: &B) -> (f32, [i8; KV_BLOCK]) {
    let raw = b.bytes();
    (
        f16(u16::from_le_bytes([raw[0], raw[1]])),
        B::levels(&raw[2..]),
    )
}

pub(crate) trait QuantBlock {
    fn bytes(&self) -> &[u8];
    fn levels(qs: &[u8]) -> [i8; KV_BLOCK];
}

impl QuantBlock for BlockQ8_0 {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn levels(qs: &[u8]) -> [i8; KV_BLOCK] {
        std::array::from_fn(|i| qs[i] as i8)
    }
}

impl QuantBlock for BlockQ4_0 {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn levels(qs: &[u8]) -> [i8; KV_BLOCK] {
        std::array::from_fn(|i| (if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 }) as i8 - 8)
    }
}

macro_rules! quant_elem {
    ($t:ty, $variant:ident) => {
        impl KvElem for $t {
            const PER: usize = KV_BLOCK;
            fn of(plane: KvPlane<'_>) -> Option<&[$t]> {
                match plane {
                    KvPlane::$variant(x) => Some(x),
                    _ => None,
                }
            }
            fn dot(k: &[$t], q: &[f32]) -> f32 {
                k.iter()
                    .zip(q.chunks_exact(KV_BLOCK))
                    .map(|(b, q)| {
                        let (d, l) = levels(b);
                        d * l.iter().zip(q).map(|(l, q)| *l as f32 * q).sum::<f32>()
                    })
                    .sum()
            }
            fn add_scaled(v: &[$t], w: f32, out: &mut [f32]) {
                for (b, o) in v.iter().zip(out.chunks_exact_mut(KV_BLOCK)) {
                    let (d, l) = levels(b);
                    o.iter_mut()
                        .zip(l)
                        .for_each(|(o, l)| *o += w * (l as f32 * d));
                }
            }
        }
    };
}
quant_elem!(BlockQ8_0, Q8_0);
quant_elem!(BlockQ4_0, Q4_0);

/// Scores of one ISA for key rows of type `E`, resolved statically inside the attention loops.
trait KeyOps<E: KvElem> {
    /// Query heads per score tile (beside four keys): as many as the registers hold.
    const TILE_HEADS: usize = 3;
    /// `out[r][t] = k[r] · q[t]` over `hd` values, `R ≤ 4` keys by `T ≤ TILE_HEADS` query rows.
    fn dots<const R: usize, const T: usize>(
        k: &[*const E; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    );
    /// `row[i] ← e^(row[i] − shift)`, returning their sum.
    fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - shift).exp();
            sum += *s;
        }
        sum
    }
}

/// Weighted sums of one ISA over value rows of type `E`.
trait ValueOps<E: KvElem> {
    /// `out[r] += Σ_j p[r][j] · v[j]` over rows of `hd` values.
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const E],
        hd: usize,
        out: &[*mut f32; R],
    );
}

struct Scalar;
impl<E: KvElem> KeyOps<E> for Scalar {
    fn dots<const R: usize, const T: usize>(
        k: &[*const E; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        for r in 0..R {
            for t in 0..T {
                // SAFETY: the caller passes rows of `hd` values.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(k[r], hd / E::PER),
                        std::slice::from_raw_parts(q[t], hd),
                    )
                };
                out[r][t] = E::dot(a, b);
            }
        }
    }
}
impl<E: KvElem> ValueOps<E> for Scalar {
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const E],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        for r in 0..R {
            // SAFETY: the caller passes `v.len()` weights per row and rows of `hd` values.
            let (w, o) = unsafe {
                (
                    std::slice::from_raw_parts(p[r], v.len()),
                    std::slice::from_raw_parts_mut(out[r], hd),
                )
            };
            for (wj, vj) in w.iter().zip(v) {
                // SAFETY: as above.
                let vj = unsafe { std::slice::from_raw_parts(*vj, hd / E::PER) };
                E::add_scaled(vj, *wj, o);
            }
        }
    }
}

/// AVX2 + FMA + F16C kernels (also what the AVX-512 path runs where it has no wider one).
#[cfg(target_arch = "x86_64")]
struct Avx2;

/// Implements [`KeyOps`] and [`ValueOps`] for `Avx2` with the given kernels; `$lanes` is the
/// multiple of `hd` the value kernel needs (the scalar one takes other head sizes).
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_ops {
    ($e:ty, $tile:path, $rows:path, $lanes:expr) => {
        impl KeyOps<$e> for Avx2 {
            fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
                // SAFETY: only instantiated when `Isa` is Avx2 or Avx512, which imply AVX2
                // and FMA.
                unsafe { crate::x86::avx2::exp_shifted(row, shift) }
            }
            fn dots<const R: usize, const T: usize>(
                k: &[*const $e; R],
                q: &[*const f32; T],
                hd: usize,
                out: &mut [[f32; T]; R],
            ) {
                // SAFETY: only instantiated when `Isa` is Avx2 or Avx512, which imply AVX2,
                // FMA and F16C; rows hold `hd` values.
                unsafe { $tile(k, q, hd, out) }
            }
        }
        impl ValueOps<$e> for Avx2 {
            fn weighted_rows<const R: usize>(
                p: &[*const f32; R],
                v: &[*const $e],
                hd: usize,
                out: &[*mut f32; R],
            ) {
                if !hd.is_multiple_of($lanes) {
                    return <Scalar as ValueOps<$e>>::weighted_rows(p, v, hd, out);
                }
                // SAFETY: as above; `hd` is a multiple of the kernel's width.
                unsafe { $rows(p, v, hd, out) }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
avx2_ops!(
    f32,
    crate::x86::avx2::tile::<R, T>,
    crate::x86::avx2::weighted_rows::<R>,
    16
);
#[cfg(target_arch = "x86_64")]
avx2_ops!(
    u16,
    crate::x86::avx2::tile_f16::<R, T>,
    crate::x86::avx2::weighted_rows_f16::<R>,
    16
);
#[cfg(target_arch = "x86_64")]
avx2_ops!(
    BlockQ8_0,
    crate::x86::avx2_kv::tile_q8_0::<R, T>,
    crate::x86::avx2_kv::weighted_rows_q8_0::<R>,
    KV_BLOCK
);
#[cfg(target_arch = "x86_64")]
avx2_ops!(
    BlockQ4_0,
    crate::x86::avx2_kv::tile_q4_0::<R, T>,
    crate::x86::avx2_kv::weighted_rows_q4_0::<R>,
    KV_BLOCK
);

/// 512-bit tiles over f16 rows.
#[cfg(target_arch = "x86_64")]
struct Avx512;
#[cfg(target_arch = "x86_64")]
impl KeyOps<u16> for Avx512 {
    // 16 accumulators, 4 query and 1 key register of 32.
    const TILE_HEADS: usize = 4;
    fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        <Avx2 as KeyOps<u16>>::exp_shifted(row, shift)
    }
    fn dots<const R: usize, const T: usize>(
        k: &[*const u16; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        // SAFETY: only instantiated when `Isa` is Avx512 (AVX-512 F with AVX2, FMA, F16C);
        // rows hold `hd` elements.
        unsafe { crate::x86::avx512_attention::tile_f16::<R, T>(k, q, hd, out) }
    }
}
#[cfg(target_arch = "x86_64")]
impl ValueOps<u16> for Avx512 {
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const u16],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        if !hd.is_multiple_of(32) {
            return <Avx2 as ValueOps<u16>>::weighted_rows(p, v, hd, out);
        }
        // SAFETY: as above; `hd` is a multiple of 32.
        unsafe { crate::x86::avx512_attention::weighted_rows_f16::<R>(p, v, hd, out) }
    }
}

thread_local! {
    /// Value-row addresses of the current attention call.
    static VALUES: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The cached rows of one kv head that one attention call reads, as a KV cache of blocks holds
/// them: position `p` lives in block `blocks[p / block_len]`, slot `p % block_len`, and slot `s`
/// of the storage starts `s·stride` values into `keys` and `values` (whose slices start at the
/// kv head's first column). The keys read are positions `first .. first + n`; blocks before
/// `first`'s are never touched (a sliding window may have released them).
#[derive(Clone, Copy, Debug)]
pub struct KvBlocks<'a> {
    pub keys: KvPlane<'a>,
    pub values: KvPlane<'a>,
    /// Values per slot: a multiple of [`KV_BLOCK`] for quantized planes.
    pub stride: usize,
    /// Positions per block: a power of two.
    pub block_len: usize,
    pub blocks: &'a [u32],
    pub first: usize,
    pub n: usize,
}

/// Which element type a plane holds, for dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

pub(crate) fn kind(p: &KvPlane<'_>) -> Kind {
    match p {
        KvPlane::F32(_) => Kind::F32,
        KvPlane::F16(_) => Kind::F16,
        KvPlane::Q8_0(_) => Kind::Q8_0,
        KvPlane::Q4_0(_) => Kind::Q4_0,
    }
}

/// The arguments of one attention call, passed through the type dispatch.
struct Call<'a, 'b> {
    q: &'b [f32],
    hd: usize,
    /// Kv heads side by side in each slot of `kv`, attended by equal groups of `q`'s heads.
    kv_heads: usize,
    kv: &'b KvBlocks<'a>,
    scale: f32,
    scores: &'b mut Vec<f32>,
    out: &'b mut [f32],
    /// Where to leave each head's running maximum then sum, `out` unnormalized (a partial
    /// over some of the keys, merged by [`merge_partials`]); None normalizes `out`.
    stats: Option<&'b mut [f32]>,
}

impl Compute {
    /// `out[r] = Σ_j softmax_j(scale · q[r]·k_j) · v_j` for each query head `r` (rows of `hd`
    /// values in `q` and `out`), over the keys of `kv` in position order. `scores` is
    /// caller-owned scratch so the hot path allocates nothing.
    ///
    /// Panics if `kv` names a block outside its planes, its block length is not a power of two,
    /// or a quantized plane's head size is not whole blocks (the cache's bug, not input).
    pub fn attend_heads(
        &self,
        q: &[f32],
        hd: usize,
        kv: &KvBlocks<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        out.iter_mut().for_each(|o| *o = 0.0);
        if kv.n == 0 || hd == 0 {
            return;
        }
        self.dispatch(Call {
            q,
            hd,
            kv_heads: 1,
            kv,
            scale,
            scores,
            out,
            stats: None,
        })
    }

    /// [`Compute::attend_heads`] over a part of the keys, left unnormalized: `out[r]` is
    /// `Σ_j e^(s_rj − m_r) · v_j` and `stats` holds every head's `m_r` (the largest scaled score),
    /// then every head's `Σ_j e^(s_rj − m_r)`. Parts of one query's keys, attended in parallel,
    /// combine exactly with [`merge_partials`] (flash decoding).
    ///
    /// `q`'s heads are `kv_heads` equal groups, group g attending the kv head in columns
    /// `g·hd .. (g + 1)·hd` of `kv`'s slots: one call over every kv head reads whole slot rows,
    /// in order, where a call per kv head reads a strided part of each. Each head's arithmetic
    /// is the same either way.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_heads_partial(
        &self,
        q: &[f32],
        hd: usize,
        kv_heads: usize,
        kv: &KvBlocks<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        stats: &mut [f32],
    ) {
        out.iter_mut().for_each(|o| *o = 0.0);
        let heads = q.len() / hd.max(1);
        stats[..heads].fill(f32::NEG_INFINITY);
        stats[heads..2 * heads].fill(0.0);
        if kv.n == 0 || hd == 0 {
            return;
        }
        assert!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "attention: {heads} query heads do not make {kv_heads} equal groups"
        );
        self.dispatch(Call {
            q,
            hd,
            kv_heads,
            kv,
            scale,
            scores,
            out,
            stats: Some(stats),
        })
    }

    fn dispatch(&self, call: Call<'_, '_>) {
        let kv = call.kv;
        let isa = self.isa();
        match (isa, kind(&kv.keys)) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, Kind::F32) => {
                with_keys::<Avx2, f32>(isa, call)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2 | Isa::AvxVnni, Kind::F16) => with_keys::<Avx2, u16>(isa, call),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, Kind::F16) => with_keys::<Avx512, u16>(isa, call),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, Kind::Q8_0) => {
                with_keys::<Avx2, BlockQ8_0>(isa, call)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, Kind::Q4_0) => {
                with_keys::<Avx2, BlockQ4_0>(isa, call)
            }
            (_, Kind::F32) => with_keys::<Scalar, f32>(isa, call),
            (_, Kind::F16) => with_keys::<Scalar, u16>(isa, call),
            (_, Kind::Q8_0) => with_keys::<Scalar, BlockQ8_0>(isa, call),
            (_, Kind::Q4_0) => with_keys::<Scalar, BlockQ4_0>(isa, call),
        }
    }
}

/// The value half of the dispatch, keys already chosen.
fn with_keys<KO: KeyOps<K>, K: KvElem>(isa: Isa, c: Call<'_, '_>) {
    match (isa, kind(&c.kv.values)) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, Kind::F32) => typed::<KO, K, Avx2, f32>(c),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::AvxVnni, Kind::F16) => typed::<KO, K, Avx2, u16>(c),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Kind::F16) => typed::<KO, K, Avx512, u16>(c),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, Kind::Q8_0) => typed::<KO, K, Avx2, BlockQ8_0>(c),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, Kind::Q4_0) => typed::<KO, K, Avx2, BlockQ4_0>(c),
        (_, Kind::F32) => typed::<KO, K, Scalar, f32>(c),
        (_, Kind::F16) => typed::<KO, K, Scalar, u16>(c),
        (_, Kind::Q8_0) => typed::<KO, K, Scalar, BlockQ8_0>(c),
        (_, Kind::Q4_0) => typed::<KO, K, Scalar, BlockQ4_0>(c),
    }
}

/// Key and value addresses of a [`KvBlocks`], its block ids checked once per call.
#[derive(Clone, Copy)]
struct Rows<'a, K, V> {
    k: *const K,
    v: *const V,
    /// Elements between slots.
    k_stride: usize,
    v_stride: usize,
    shift: u32,
    blocks: &'a [u32],
    first: usize,
}

impl<K, V> Rows<'_, K, V> {
    /// Key and value `j` (in range by construction).
    #[inline(always)]
    fn get(&self, j: usize) -> (*const K, *const V) {
        let p = self.first + j;
        let mask = (1usize << self.shift) - 1;
        let slot = ((self.blocks[p >> self.shift] as usize) << self.shift) | (p & mask);
        // SAFETY (of later reads): `typed` checked every block read lies inside the planes.
        (
            self.k.wrapping_add(slot * self.k_stride),
            self.v.wrapping_add(slot * self.v_stride),
        )
    }

    /// Hints the key rows (`k_bytes` each) and value rows (`v_bytes`) of `keys` into L1.
    #[inline]
    fn prefetch(&self, keys: std::ops::Range<usize>, k_bytes: usize, v_bytes: usize) {
        #[cfg(target_arch = "x86_64")]
        for j in keys {
            let (k, v) = self.get(j);
            crate::x86::prefetch(k.cast(), k_bytes);
            crate::x86::prefetch(v.cast(), v_bytes);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (keys, k_bytes, v_bytes);
    }
}

impl KvPlane<'_> {
    /// Elements the plane holds and values per element.
    fn extent(&self) -> (usize, usize) {
        match self {
            KvPlane::F32(x) => (x.len(), 1),
            KvPlane::F16(x) => (x.len(), 1),
            KvPlane::Q8_0(x) => (x.len(), KV_BLOCK),
            KvPlane::Q4_0(x) => (x.len(), KV_BLOCK),
        }
    }
}

/// Checks once per call that every block `kv` reads lies inside its planes and that heads and
/// slots are whole elements; a failure is the cache's bug, not input, so it panics.
pub(crate) fn check_view(kv: &KvBlocks<'_>, hd: usize) {
    assert!(
        kv.block_len.is_power_of_two() && kv.stride >= hd,
        "attention: block length {} is not a power of two, or stride {} < head size {hd}",
        kv.block_len,
        kv.stride
    );
    let (b0, b1) = (
        kv.first / kv.block_len,
        (kv.first + kv.n - 1) / kv.block_len,
    );
    let ids = kv
        .blocks
        .get(b0..=b1)
        .expect("attention: the block table is shorter than its keys");
    let slots = ids
        .iter()
        .map(|&b| (b as usize + 1) * kv.block_len)
        .max()
        .unwrap_or(0);
    for plane in [kv.keys, kv.values] {
        let (len, per) = plane.extent();
        assert!(
            hd.is_multiple_of(per) && kv.stride.is_multiple_of(per),
            "attention: head size {hd} or stride {} is not whole blocks of {per}",
            kv.stride
        );
        assert!(
            len >= ((slots - 1) * kv.stride + hd) / per,
            "attention: a block outside the cache planes"
        );
    }
}

/// [`attend`] over keys of type `K` and values of type `W`, the types, shapes and every block
/// read checked once.
fn typed<KO: KeyOps<K>, K: KvElem, VO: ValueOps<W>, W: KvElem>(c: Call<'_, '_>) {
    let kv = c.kv;
    let hd = c.hd;
    let k = K::of(kv.keys).expect("dispatched on the key type");
    let v = W::of(kv.values).expect("dispatched on the value type");
    check_view(kv, c.kv_heads * hd);
    let rows = Rows {
        k: k.as_ptr(),
        v: v.as_ptr(),
        k_stride: kv.stride / K::PER,
        v_stride: kv.stride / W::PER,
        shift: kv.block_len.trailing_zeros(),
        blocks: kv.blocks,
        first: kv.first,
    };
    let heads = (c.q, hd, c.kv_heads);
    attend::<KO, K, VO, W>(heads, kv.n, &rows, c.scale, c.scores, c.out, c.stats)
}

/// Keys per block of the online softmax: their scores stay in L1 between the two passes.
const KEY_BLOCK: usize = 64;

/// Online softmax over blocks of [`KEY_BLOCK`] keys: each block's scores, then its weights
/// against the running maximum (earlier output rescaled when the maximum grows), then its
/// values added in; one division by the running sum at the end (or the maxima and sums left
/// in `partial`). `out` starts zeroed.
#[allow(clippy::too_many_arguments)]
fn attend<KO: KeyOps<K>, K: KvElem, VO: ValueOps<W>, W: KvElem>(
    (q, hd, kv_heads): (&[f32], usize, usize),
    n_keys: usize,
    kv: &Rows<'_, K, W>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    partial: Option<&mut [f32]>,
) {
    let heads = q.len() / hd;
    let group = heads / kv_heads;
    // Elements of K and W between two kv heads' columns of a slot.
    let (k_next, v_next) = (hd / K::PER, hd / W::PER);
    scores.clear();
    scores.resize(heads * (KEY_BLOCK + 2), 0.0);
    let (block, stats) = scores.split_at_mut(heads * KEY_BLOCK);
    let (maxes, sums) = stats.split_at_mut(heads);
    maxes.fill(f32::NEG_INFINITY);
    // Key and value rows are requested a block ahead, four at a time beside the key tiles
    // that use the block before (so the requests overlap the arithmetic), the first block's
    // all at once: between two tokens the weights stream through the caches and evict the KV rows,
    // and one head group's rows are short and strided, so a prefetcher finds no stream in
    // them and each key tile otherwise waited for memory in turn.
    let row_bytes = |per: usize, size: usize| hd / per * size;
    let (k_bytes, v_bytes) = (
        kv_heads * row_bytes(K::PER, std::mem::size_of::<K>()),
        kv_heads * row_bytes(W::PER, std::mem::size_of::<W>()),
    );
    kv.prefetch(0..n_keys.min(KEY_BLOCK), k_bytes, v_bytes);
    VALUES.with_borrow_mut(|values| {
        for b0 in (0..n_keys).step_by(KEY_BLOCK) {
            let nb = (n_keys - b0).min(KEY_BLOCK);
            values.clear();
            // Scores four keys by up to `TILE_HEADS` heads at a time: each key row is loaded
            // once per tile of heads, each head once per four keys.
            let mut j0 = 0;
            while j0 < nb {
                let nk = (nb - j0).min(4);
                let ahead = (b0 + j0 + KEY_BLOCK).min(n_keys);
                kv.prefetch(ahead..(ahead + nk).min(n_keys), k_bytes, v_bytes);
                let mut keys = [std::ptr::null::<K>(); 4];
                for (i, k) in keys[..nk].iter_mut().enumerate() {
                    let (kj, vj) = kv.get(b0 + j0 + i);
                    *k = kj;
                    values.push(vj as usize);
                }
                // Heads tiled within their group, as a call per kv head tiles them.
                for g in 0..kv_heads {
                    let keys = keys.map(|k| k.wrapping_add(g * k_next));
                    let mut r0 = g * group;
                    while r0 < (g + 1) * group {
                        let nr = ((g + 1) * group - r0).min(KO::TILE_HEADS);
                        let rows: [*const f32; 4] =
                            std::array::from_fn(|t| q[(r0 + t.min(nr - 1)) * hd..].as_ptr());
                        let mut put = |r: usize, t: usize, v: f32| {
                            block[(r0 + t) * KEY_BLOCK + j0 + r] = v * scale;
                        };
                        key_tile::<KO, K>(&keys, nk, &rows, nr, hd, &mut put);
                        r0 += nr;
                    }
                }
                j0 += nk;
            }
            for r in 0..heads {
                let row = &mut block[r * KEY_BLOCK..r * KEY_BLOCK + nb];
                let max = row_max(row, maxes[r]);
                // exp(-inf) = 0 on the first block, where output and sum are still zero.
                let rescale = (maxes[r] - max).exp();
                if rescale != 1.0 {
                    out[r * hd..(r + 1) * hd]
                        .iter_mut()
                        .for_each(|o| *o *= rescale);
                    sums[r] *= rescale;
                }
                sums[r] += KO::exp_shifted(row, max);
                maxes[r] = max;
            }
            // Group g's value rows: kv head 0's shifted by g heads' columns.
            for g in 1..kv_heads {
                let shift = g * v_next * std::mem::size_of::<W>();
                values.extend_from_within(..nb);
                values[g * nb..].iter_mut().for_each(|v| *v += shift);
            }
            let mut r0 = 0;
            while r0 < heads {
                let g = r0 / group;
                let nr = ((g + 1) * group - r0).min(4);
                let vptrs: &[*const W] =
                    // SAFETY: `usize` and `*const W` have the same size and alignment; the
                    // addresses came from live value rows.
                    unsafe { std::slice::from_raw_parts(values[g * nb..].as_ptr().cast(), nb) };
                let p = |r: usize| block[(r0 + r.min(nr - 1)) * KEY_BLOCK..].as_ptr();
                let base = out.as_mut_ptr();
                // SAFETY: row r0 + r < heads lies inside `out`.
                let o = |r: usize| unsafe { base.add((r0 + r.min(nr - 1)) * hd) };
                match nr {
                    4 => VO::weighted_rows::<4>(
                        &[p(0), p(1), p(2), p(3)],
                        vptrs,
                        hd,
                        &[o(0), o(1), o(2), o(3)],
                    ),
                    3 => {
                        VO::weighted_rows::<3>(&[p(0), p(1), p(2)], vptrs, hd, &[o(0), o(1), o(2)])
                    }
                    2 => VO::weighted_rows::<2>(&[p(0), p(1)], vptrs, hd, &[o(0), o(1)]),
                    _ => VO::weighted_rows::<1>(&[p(0)], vptrs, hd, &[o(0)]),
                }
                r0 += nr;
            }
        }
    });
    if let Some(partial) = partial {
        partial[..heads].copy_from_slice(maxes);
        partial[heads..2 * heads].copy_from_slice(sums);
        return;
    }
    for (row, sum) in out.chunks_exact_mut(hd).zip(sums.iter()) {
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// The largest of `init` and `row` (NaNs ignored, as `f32::max` does) in sixteen independent
/// lanes, which the compiler turns into vector maxima: one chained `max` per key cost as much
/// as the key's scores. The maximum of a set does not depend on the order it is taken in.
fn row_max(row: &[f32], init: f32) -> f32 {
    let mut lanes = [init; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let rest = chunks.remainder().iter().copied().fold(init, f32::max);
    lanes.iter().copied().fold(rest, f32::max)
}

/// Combines partial attentions of the same `heads` query heads over disjoint parts of their
/// keys ([`Compute::attend_heads_partial`]: each part's unnormalized rows of `hd` values and its
/// stats) into the normalized result in `out`: every part rescaled to the overall maximum, then
/// one division by the rescaled sums.
pub fn merge_partials<'a>(
    parts: impl Iterator<Item = (&'a [f32], &'a [f32])> + Clone,
    heads: usize,
    hd: usize,
    out: &mut [f32],
) {
    for r in 0..heads {
        let max = parts
            .clone()
            .map(|(_, s)| s[r])
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[r * hd..(r + 1) * hd];
        o.fill(0.0);
        let mut sum = 0.0;
        for (part, s) in parts.clone() {
            if s[r] == f32::NEG_INFINITY {
                continue; // a part with no keys
            }
            let w = (s[r] - max).exp();
            sum += w * s[heads + r];
            o.iter_mut()
                .zip(&part[r * hd..(r + 1) * hd])
                .for_each(|(o, p)| *o += w * p);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// One tile of scores: `nk ≤ 4` keys by `nr ≤ 4` query rows, reported through `put(key, row, v)`.
fn key_tile<V: KeyOps<E>, E: KvElem>(
    keys: &[*const E; 4],
    nk: usize,
    rows: &[*const f32; 4],
    nr: usize,
    hd: usize,
    put: &mut impl FnMut(usize, usize, f32),
) {
    fn go<V: KeyOps<E>, E: KvElem, const R: usize, const T: usize>(
        keys: &[*const E; 4],
        rows: &[*const f32; 4],
        hd: usize,
        put: &mut impl FnMut(usize, usize, f32),
    ) {
        let k: [*const E; R] = std::array::from_fn(|i| keys[i]);
        let q: [*const f32; T] = std::array::from_fn(|i| rows[i]);
        let mut out = [[0f32; T]; R];
        V::dots::<R, T>(&k, &q, hd, &mut out);
        for (r, row) in out.iter().enumerate() {
            for (t, v) in row.iter().enumerate() {
                put(r, t, *v);
            }
        }
    }
    match (nk, nr) {
        (4, 4) => go::<V, E, 4, 4>(keys, rows, hd, put),
        (3, 4) => go::<V, E, 3, 4>(keys, rows, hd, put),
        (2, 4) => go::<V, E, 2, 4>(keys, rows, hd, put),
        (1, 4) => go::<V, E, 1, 4>(keys, rows, hd, put),
        (4, 3) => go::<V, E, 4, 3>(keys, rows, hd, put),
        (4, 2) => go::<V, E, 4, 2>(keys, rows, hd, put),
        (4, 1) => go::<V, E, 4, 1>(keys, rows, hd, put),
        (3, 3) => go::<V, E, 3, 3>(keys, rows, hd, put),
        (3, 2) => go::<V, E, 3, 2>(keys, rows, hd, put),
        (3, 1) => go::<V, E, 3, 1>(keys, rows, hd, put),
        (2, 3) => go::<V, E, 2, 3>(keys, rows, hd, put),
        (2, 2) => go::<V, E, 2, 2>(keys, rows, hd, put),
        (2, 1) => go::<V, E, 2, 1>(keys, rows, hd, put),
        (1, 3) => go::<V, E, 1, 3>(keys, rows, hd, put),
        (1, 2) => go::<V, E, 1, 2>(keys, rows, hd, put),
        _ => go::<V, E, 1, 1>(keys, rows, hd, put),
    }
}

/// Rotates each `n`-value block of `rows` by the normalized Walsh–Hadamard matrix `H/√n` (`n` a
/// power of two): orthogonal and its own inverse, so rotating queries and keys alike leaves
/// every score unchanged while spreading a key's outlier channels over the block before it is
/// quantized.
pub fn hadamard_rotate(rows: &mut [f32], n: usize) {
    assert!(
        n.is_power_of_two(),
        "Hadamard rotation of blocks of {n} values"
    );
    // The head widths models have, with the block length known at compile time: the loops
    // unroll and vectorize without bounds checks (the same operations in the same order, so
    // the same bits as the general loop). A prompt's queries and keys all pass here.
    match n {
        32 => rotate_blocks::<32>(rows),
        64 => rotate_blocks::<64>(rows),
        128 => rotate_blocks::<128>(rows),
        256 => rotate_blocks::<256>(rows),
        _ => rows.chunks_exact_mut(n).for_each(walsh_hadamard),
    }
}

fn rotate_blocks<const N: usize>(rows: &mut [f32]) {
    for block in rows.chunks_exact_mut(N) {
        let block: &mut [f32; N] = block.try_into().expect("chunks of N");
        walsh_hadamard(block);
    }
}

/// `block ← H·block/√n` in place, butterflies of span 1, 2, 4, … (the fast transform).
#[inline(always)]
fn walsh_hadamard(block: &mut [f32]) {
    let n = block.len();
    let norm = 1.0 / (n as f32).sqrt();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            let (low, high) = block[i..i + 2 * h].split_at_mut(h);
            for (a, b) in low.iter_mut().zip(high) {
                (*a, *b) = (*a + *b, *a - *b);
            }
        }
        h *= 2;
    }
    block.iter_mut().for_each(|x| *x *= norm);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Cached rows of one type laid out as the cache lays them out.
    pub(crate) enum Plane {
        F32(Vec<f32>),
        F16(Vec<u16>),
        Q8(Vec<BlockQ8_0>),
        Q4(Vec<BlockQ4_0>),
    }

    impl Plane {
        pub(crate) fn view(&self) -> KvPlane<'_> {
            match self {
                Plane::F32(x) => KvPlane::F32(x),
                Plane::F16(x) => KvPlane::F16(x),
                Plane::Q8(x) => KvPlane::Q8_0(x),
                Plane::Q4(x) => KvPlane::Q4_0(x),
            }
        }
    }

    /// `rows` stored in `kind` at `slot(j)` of `slots` slots of `stride` values, everything
    /// else NaN (so a read of the wrong slot or past a head shows), and the rows as stored.
    pub(crate) fn store(
        kind: Kind,
        rows: &[Vec<f32>],
        slot: impl Fn(usize) -> usize,
        slots: usize,
        stride: usize,
    ) -> (Plane, Vec<Vec<f32>>) {
        let hd = rows[0].len();
        let n = slots * stride;
        let nan_half = 0x7E00u16;
        let mut stored = Vec::new();
        let plane = match kind {
            Kind::F32 => {
                let mut p = vec![f32::NAN; n];
                for (j, r) in rows.iter().enumerate() {
                    p[slot(j) * stride..][..hd].copy_from_slice(r);
                    stored.push(r.clone());
                }
                Plane::F32(p)
            }
            Kind::F16 => {
                let mut p = vec![nan_half; n];
                for (j, r) in rows.iter().enumerate() {
                    let h: Vec<u16> = r
                        .iter()
                        .map(|x| half::f16::from_f32(*x).to_bits())
                        .collect();
                    stored.push(h.iter().map(|b| f16(*b)).collect());
                    p[slot(j) * stride..][..hd].copy_from_slice(&h);
                }
                Plane::F16(p)
            }
            Kind::Q8_0 | Kind::Q4_0 => {
                let (nb, bs) = (n / KV_BLOCK, stride / KV_BLOCK);
                let mut raw: Vec<Vec<u8>> = Vec::new();
                let size = if kind == Kind::Q8_0 { 34 } else { 18 };
                for _ in 0..nb {
                    let mut b = vec![0u8; size];
                    b[..2].copy_from_slice(&nan_half.to_le_bytes());
                    raw.push(b);
                }
                for (j, r) in rows.iter().enumerate() {
                    let mut back = Vec::new();
                    for (i, x) in r.chunks_exact(KV_BLOCK).enumerate() {
                        let x: &[f32; 32] = x.try_into().unwrap();
                        let b = &mut raw[slot(j) * bs + i];
                        let mut y = [0f32; 32];
                        if kind == Kind::Q8_0 {
                            let b: &mut [u8; 34] = b.as_mut_slice().try_into().unwrap();
                            edgelm_quant::q8_0::quantize_block(x, b);
                            edgelm_quant::q8_0::dequantize_block(b, &mut y);
                        } else {
                            let b: &mut [u8; 18] = b.as_mut_slice().try_into().unwrap();
                            edgelm_quant::q4_0::quantize_block(x, b);
                            edgelm_quant::q4_0::dequantize_block(b, &mut y);
                        }
                        back.extend_from_slice(&y);
                    }
                    stored.push(back);
                }
                if kind == Kind::Q8_0 {
                    Plane::Q8(
                        raw.iter()
                            .map(|b| BlockQ8_0(b.as_slice().try_into().unwrap()))
                            .collect(),
                    )
                } else {
                    Plane::Q4(
                        raw.iter()
                            .map(|b| BlockQ4_0(b.as_slice().try_into().unwrap()))
                            .collect(),
                    )
                }
            }
        };
        (plane, stored)
    }

    #[test]
    fn grouped_attention_matches_plain_softmax_on_every_isa_and_type() {
        let mut rng = crate::test_rng::Rng(0x5eed);
        let mut rnd = || rng.unit();
        use Kind::*;
        // Head sizes off and on the 16-lane tile, head counts off and on the 3- and 4-row
        // tiles, key counts off and on the 4-key tile and across several online-softmax
        // blocks; quantized planes only where the head is whole blocks.
        for (hd, heads, n_keys) in [
            (24, 3, 17),
            (64, 4, 5),
            (256, 5, 1),
            (32, 1, 9),
            (48, 7, 4),
            (256, 4, 300),
            (64, 2, 200),
            (16, 4, 129),
            (96, 3, 70),
        ] {
            for kinds in [
                (F32, F32),
                (F16, F16),
                (Q8_0, Q8_0),
                (Q4_0, Q4_0),
                (Q8_0, F16),
                (F16, Q4_0),
                (Q4_0, Q8_0),
            ] {
                let quantized =
                    kinds.0 != F32 && kinds.0 != F16 || kinds.1 == Q8_0 || kinds.1 == Q4_0;
                if quantized && hd % KV_BLOCK != 0 {
                    continue;
                }
                check_attention(hd, heads, n_keys, kinds, &mut rnd);
            }
        }
    }

    /// Against a float64 softmax over the keys and values as stored (so only the kernels' own
    /// rounding remains).
    fn check_attention(
        hd: usize,
        heads: usize,
        n_keys: usize,
        (kk, vk): (Kind, Kind),
        rnd: &mut impl FnMut() -> f32,
    ) {
        // Scores spread over tens of units, as real attention logits are.
        let q: Vec<f32> = (0..heads * hd).map(|_| rnd() * 4.0).collect();
        let mut rows = || -> Vec<Vec<f32>> {
            (0..n_keys)
                .map(|_| (0..hd).map(|_| rnd()).collect())
                .collect()
        };
        let (keys, values) = (rows(), rows());
        // Rows `stride` apart in blocks of four slots, as the cache lays them out; the blocks
        // in reverse order with a spare block between, the keys starting one slot into the
        // first block.
        let quantized = [kk, vk]
            .iter()
            .any(|k| matches!(k, Kind::Q8_0 | Kind::Q4_0));
        let stride = hd + if quantized { KV_BLOCK } else { 3 };
        let (block_len, first) = (4, 1);
        let n_blocks = (first + n_keys).div_ceil(block_len);
        let blocks: Vec<u32> = (0..n_blocks).map(|b| (2 * (n_blocks - b)) as u32).collect();
        let slots = (2 * n_blocks + 1) * block_len;
        let slot = |j: usize| {
            let p = first + j;
            blocks[p / block_len] as usize * block_len + p % block_len
        };
        let (kp, k_ref) = store(kk, &keys, slot, slots, stride);
        let (vp, v_ref) = store(vk, &values, slot, slots, stride);
        let kv = KvBlocks {
            keys: kp.view(),
            values: vp.view(),
            stride,
            block_len,
            blocks: &blocks,
            first,
            n: n_keys,
        };
        let scale = 0.3f32;
        for isa in Isa::available() {
            let c = Compute::precise(isa, 1);
            let mut out = vec![0f32; heads * hd];
            c.attend_heads(&q, hd, &kv, scale, &mut Vec::new(), &mut out);
            for r in 0..heads {
                let s: Vec<f64> = k_ref
                    .iter()
                    .map(|k| {
                        (0..hd)
                            .map(|i| q[r * hd + i] as f64 * k[i] as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                for i in 0..hd {
                    let want: f64 = (0..n_keys)
                        .map(|j| (s[j] - max).exp() / z * v_ref[j][i] as f64)
                        .sum();
                    let got = out[r * hd + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{isa} keys {kk:?} values {vk:?} hd {hd} heads {heads} keys {n_keys}: \
                         head {r} dim {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Attention over three parts of the keys, merged, equals attention over all of them, on
    /// every path and for exact and quantized types (an empty part included).
    #[test]
    fn partial_attentions_merge_into_the_whole() {
        let mut rng = crate::test_rng::Rng(0xfeed);
        let mut rnd = || rng.unit();
        let (hd, heads, n) = (64, 7, 300usize);
        let q: Vec<f32> = (0..heads * hd).map(|_| rnd() * 4.0).collect();
        let rows: Vec<Vec<f32>> = (0..n).map(|_| (0..hd).map(|_| rnd()).collect()).collect();
        let vals: Vec<Vec<f32>> = (0..n).map(|_| (0..hd).map(|_| rnd()).collect()).collect();
        let blocks: Vec<u32> = (0..n.div_ceil(4) as u32).collect();
        for kinds in [
            (Kind::F16, Kind::F16),
            (Kind::Q8_0, Kind::Q4_0),
            (Kind::F32, Kind::F32),
        ] {
            let (kp, _) = store(kinds.0, &rows, |j| j, n, hd);
            let (vp, _) = store(kinds.1, &vals, |j| j, n, hd);
            let view = |first: usize, len: usize| KvBlocks {
                keys: kp.view(),
                values: vp.view(),
                stride: hd,
                block_len: 4,
                blocks: &blocks,
                first,
                n: len,
            };
            for isa in Isa::available() {
                let c = Compute::precise(isa, 1);
                let mut whole = vec![0f32; heads * hd];
                c.attend_heads(&q, hd, &view(0, n), 0.3, &mut Vec::new(), &mut whole);
                let cuts = [(0, 0), (0, 123), (123, 100), (223, 77)];
                let mut parts = vec![(vec![0f32; heads * hd], vec![0f32; 2 * heads]); cuts.len()];
                for ((first, len), (o, st)) in cuts.iter().zip(&mut parts) {
                    c.attend_heads_partial(
                        &q,
                        hd,
                        1,
                        &view(*first, *len),
                        0.3,
                        &mut Vec::new(),
                        o,
                        st,
                    );
                }
                let mut merged = vec![0f32; heads * hd];
                let it = parts.iter().map(|(o, s)| (o.as_slice(), s.as_slice()));
                merge_partials(it, heads, hd, &mut merged);
                for (i, (a, b)) in whole.iter().zip(&merged).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{isa} {kinds:?} value {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// `p` from column `col` of slot 0 on (a whole number of blocks for quantized planes).
    fn from_column(p: KvPlane<'_>, col: usize) -> KvPlane<'_> {
        match p {
            KvPlane::F32(x) => KvPlane::F32(&x[col..]),
            KvPlane::F16(x) => KvPlane::F16(&x[col..]),
            KvPlane::Q8_0(x) => KvPlane::Q8_0(&x[col / KV_BLOCK..]),
            KvPlane::Q4_0(x) => KvPlane::Q4_0(&x[col / KV_BLOCK..]),
        }
    }

    /// One call over every kv head of the slots gives each head bit for bit what a call per kv
    /// head gives it, on every path and type (keys spanning several blocks of the online
    /// softmax, groups off the head tiles).
    #[test]
    fn one_call_over_every_kv_head_equals_a_call_per_kv_head() {
        let mut rng = crate::test_rng::Rng(0x9a11);
        let mut rnd = || rng.unit();
        for (hd, kv_heads, group, n) in [(64, 3, 3, 150usize), (32, 2, 7, 70), (64, 2, 1, 9)] {
            let heads = kv_heads * group;
            let width = kv_heads * hd;
            let q: Vec<f32> = (0..heads * hd).map(|_| rnd() * 4.0).collect();
            let mut rows = || -> Vec<Vec<f32>> {
                (0..n)
                    .map(|_| (0..width).map(|_| rnd()).collect())
                    .collect()
            };
            let (keys, vals) = (rows(), rows());
            // A spare block's worth of NaN past each slot's heads: read only by mistake.
            let stride = width + KV_BLOCK;
            let blocks: Vec<u32> = (0..n.div_ceil(4) as u32).rev().collect();
            let slot = |j: usize| (blocks[j / 4] as usize) * 4 + j % 4;
            for kinds in [
                (Kind::F16, Kind::F16),
                (Kind::Q8_0, Kind::Q4_0),
                (Kind::F32, Kind::Q8_0),
            ] {
                let (kp, _) = store(kinds.0, &keys, slot, blocks.len() * 4, stride);
                let (vp, _) = store(kinds.1, &vals, slot, blocks.len() * 4, stride);
                let view = |col: usize| KvBlocks {
                    keys: from_column(kp.view(), col),
                    values: from_column(vp.view(), col),
                    stride,
                    block_len: 4,
                    blocks: &blocks,
                    first: 0,
                    n,
                };
                for isa in Isa::available() {
                    let c = Compute::precise(isa, 1);
                    let mut all = (vec![0f32; heads * hd], vec![0f32; 2 * heads]);
                    let mut scratch = Vec::new();
                    let (o, st) = (&mut all.0, &mut all.1);
                    c.attend_heads_partial(&q, hd, kv_heads, &view(0), 0.3, &mut scratch, o, st);
                    for g in 0..kv_heads {
                        let hs = g * group..(g + 1) * group;
                        let (mut o, mut st) = (vec![0f32; group * hd], vec![0f32; 2 * group]);
                        let qg = &q[hs.start * hd..hs.end * hd];
                        let kv = view(g * hd);
                        c.attend_heads_partial(qg, hd, 1, &kv, 0.3, &mut scratch, &mut o, &mut st);
                        let label = format!("{isa} {kinds:?} hd {hd} kv head {g}");
                        assert_eq!(o, all.0[hs.start * hd..hs.end * hd], "{label}: output");
                        assert_eq!(st[..group], all.1[hs.clone()], "{label}: maxima");
                        let sums = heads + hs.start..heads + hs.end;
                        assert_eq!(st[group..], all.1[sums], "{label}: sums");
                    }
                }
            }
        }
    }

    #[test]
    fn hadamard_rotation_is_orthogonal_and_its_own_inverse() {
        let mut rng = crate::test_rng::Rng(7);
        let mut rnd = || rng.unit();
        for hd in [1, 2, 8, 32, 64, 128, 256] {
            let a: Vec<f32> = (0..3 * hd).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..3 * hd).map(|_| rnd()).collect();
            let (mut ra, mut rb) = (a.clone(), b.clone());
            hadamard_rotate(&mut ra, hd);
            hadamard_rotate(&mut rb, hd);
            for h in 0..3 {
                let dot = |x: &[f32], y: &[f32]| -> f32 {
                    x[h * hd..(h + 1) * hd]
                        .iter()
                        .zip(&y[h * hd..(h + 1) * hd])
                        .map(|(x, y)| x * y)
                        .sum()
                };
                assert!(
                    (dot(&a, &b) - dot(&ra, &rb)).abs() < 1e-4,
                    "hd {hd}: a dot product changed"
                );
            }
            // The widths with a loop of their own give the general loop's bits.
            let mut general = a.clone();
            general.chunks_exact_mut(hd).for_each(walsh_hadamard);
            assert_eq!(general, ra, "hd {hd}");
            // The first row of H is all ones: a constant head turns into one spike.
            let mut ones = vec![1f32; hd];
            hadamard_rotate(&mut ones, hd);
            assert!((ones[0] - (hd as f32).sqrt()).abs() < 1e-4);
            hadamard_rotate(&mut ra, hd);
            for (x, y) in a.iter().zip(&ra) {
                assert!(
                    (x - y).abs() < 1e-5,
                    "hd {hd}: rotating twice is not the identity"
                );
            }
        }
    }
}
