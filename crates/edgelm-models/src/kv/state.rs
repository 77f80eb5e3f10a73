//! A sequence's state as bytes: its tokens and the keys and values of the positions its cache
//! still holds (a sliding window's released positions are not kept), so a later run restores
//! them instead of recomputing. The file around it (model identity, version, checksum) is the
//! engine's session format.
//!
//! Layout, little-endian: key type, value type (u8 each: 0 f32, 1 f16, 2 q8_0, 3 q4_0),
//! rotation (u8: 1 keys, 2 values, 3 both), block length (u32), token count (u64), the tokens (u32 each),
//! group count (u32); per group its window (u64, `u64::MAX` for none), layer count (u32), each
//! layer's key width (u32), the first position kept (u64); then, per group, per position kept,
//! per layer: the key, then the value, as their types store them.

use super::{KvCache, KvType, KvTypes, SeqId};
use crate::{ModelError, Result, MAX_CHUNK};

const NO_WINDOW: u64 = u64::MAX;

fn bad(what: impl std::fmt::Display) -> ModelError {
    ModelError::KvState(what.to_string())
}

/// Reads little-endian fields, every length checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad(format!("it ends inside {what}")));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

fn type_code(ty: KvType) -> u8 {
    match ty {
        KvType::F32 => 0,
        KvType::F16 => 1,
        KvType::Q8_0 => 2,
        KvType::Q4_0 => 3,
    }
}

fn read_types(r: &mut Reader<'_>) -> Result<KvTypes> {
    let mut ty = || -> Result<KvType> {
        let code = r.u8("the KV types")?;
        KvType::ALL
            .into_iter()
            .find(|&t| type_code(t) == code)
            .ok_or_else(|| bad(format!("its KV type code {code} is not known")))
    };
    let (k, v) = (ty()?, ty()?);
    let rotation = r.u8("the rotation flags")?;
    if rotation > 3 {
        return Err(bad(format!(
            "its rotation flags are {rotation}, not 0 to 3"
        )));
    }
    Ok(KvTypes {
        k,
        v,
        rotate_keys: rotation & 1 != 0,
        rotate_values: rotation & 2 != 0,
    })
}

/// Bytes of one position of `dims`-wide layers: each key, then its value.
fn position_bytes(types: KvTypes, dims: impl Iterator<Item = usize>) -> usize {
    dims.map(|d| (types.k.row_bytes(d) + types.v.row_bytes(d)) as usize)
        .sum()
}

impl KvCache {
    /// `seq`'s state (see the module's layout).
    pub fn save_state(&self, seq: SeqId) -> Result<Vec<u8>> {
        let s = self.seq(seq)?;
        let b = self.cfg.block_len;
        let len = s.tokens.len();
        let mut out = Vec::new();
        let t = self.cfg.types;
        let rotation = t.rotate_keys as u8 | (t.rotate_values as u8) << 1;
        out.extend_from_slice(&[type_code(t.k), type_code(t.v), rotation]);
        out.extend_from_slice(&(b as u32).to_le_bytes());
        out.extend_from_slice(&(len as u64).to_le_bytes());
        for t in &s.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.extend_from_slice(&(self.groups.len() as u32).to_le_bytes());
        let mut firsts = Vec::with_capacity(self.groups.len());
        for (group, table) in self.groups.iter().zip(&s.tables) {
            let window = group.window.map_or(NO_WINDOW, |w| w as u64);
            out.extend_from_slice(&window.to_le_bytes());
            let dims: Vec<usize> = group.kv_dims().collect();
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&(d as u32).to_le_bytes());
            }
            let first = table
                .iter()
                .position(|&blk| blk != super::HOLE)
                .unwrap_or(0)
                * b;
            let first = first.min(len);
            out.extend_from_slice(&(first as u64).to_le_bytes());
            firsts.push(first);
        }
        for ((group, table), first) in self.groups.iter().zip(&s.tables).zip(firsts) {
            for pos in first..len {
                let slot = table[pos / b] as usize * b + pos % b;
                for layer in 0..group.kv_dims().count() {
                    group.save_slot(layer, slot, &mut out);
                }
            }
        }
        Ok(out)
    }

    /// A new sequence restored from `state` (from [`KvCache::save_state`] of a cache for the
    /// same model, KV type and block length). Fails, holding nothing new, if the state does
    /// not match this cache, is longer than its context, or does not fit.
    pub fn load_state(&mut self, state: &[u8]) -> Result<SeqId> {
        let mut r = Reader(state);
        let types = read_types(&mut r)?;
        if types != self.cfg.types {
            return Err(bad(format!(
                "it holds a {types} KV cache and this run keeps {}; use the same \
                 --cache-type-k/-v and --kv-rotation (--precise keeps f32)",
                self.cfg.types
            )));
        }
        let block_len = r.u32("the block length")? as usize;
        if block_len != self.cfg.block_len {
            return Err(bad(format!(
                "it was saved with blocks of {block_len} positions and this cache has {}",
                self.cfg.block_len
            )));
        }
        let len = r.u64("the token count")? as usize;
        if len > self.cfg.n_ctx {
            return Err(bad(format!(
                "it holds {len} tokens, more than this run's context of {}; raise --ctx",
                self.cfg.n_ctx
            )));
        }
        let tokens: Vec<u32> = r
            .take(len * 4, "the tokens")?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n_groups = r.u32("the group count")? as usize;
        if n_groups != self.groups.len() {
            return Err(bad("its layer groups differ from this model's"));
        }
        let mut firsts = Vec::with_capacity(n_groups);
        for group in &self.groups {
            let window = r.u64("a window")?;
            let dims = (0..r.u32("a layer count")?)
                .map(|_| r.u32("a key width").map(|d| d as usize))
                .collect::<Result<Vec<usize>>>()?;
            if window != group.window.map_or(NO_WINDOW, |w| w as u64)
                || dims != group.kv_dims().collect::<Vec<_>>()
            {
                return Err(bad(
                    "its layers' windows or key widths differ from this model's",
                ));
            }
            let first = r.u64("a first position")? as usize;
            // Kept from a block start, and at least what the next position reads.
            let needed = group.window.map_or(0, |w| (len + 1).saturating_sub(w));
            if first > needed || !first.is_multiple_of(self.cfg.block_len) {
                return Err(bad("it lacks positions the model's layers read"));
            }
            firsts.push(first);
        }
        let need: usize = self
            .groups
            .iter()
            .zip(&firsts)
            .map(|(g, &first)| (len - first) * position_bytes(types, g.kv_dims()))
            .sum();
        if r.0.len() != need {
            return Err(bad(format!(
                "its keys and values take {} bytes where {need} were expected",
                r.0.len()
            )));
        }
        let data = r.0;
        let seq = self.alloc();
        // Chunk by chunk, as the forward pass appends: windows release what they passed.
        let b = self.cfg.block_len;
        let mut offsets = Vec::with_capacity(n_groups);
        let mut at = 0;
        for (g, &first) in self.groups.iter().zip(&firsts) {
            offsets.push(at);
            at += (len - first) * position_bytes(types, g.kv_dims());
        }
        let mut start = 0;
        while start < len {
            let count = MAX_CHUNK.min(len - start);
            if let Err(e) = self.reserve(seq, start, count) {
                let _ = self.free(seq);
                return Err(e);
            }
            let mut s = self.seqs[seq].take().expect("allocated above");
            for (g, group) in self.groups.iter_mut().enumerate() {
                let dims: Vec<usize> = group.kv_dims().collect();
                let row_bytes = position_bytes(types, dims.iter().copied());
                for pos in start.max(firsts[g])..start + count {
                    let slot = s.tables[g][pos / b] as usize * b + pos % b;
                    let mut from = offsets[g] + (pos - firsts[g]) * row_bytes;
                    for (layer, &d) in dims.iter().enumerate() {
                        let key = types.k.row_bytes(d) as usize;
                        let n = key + types.v.row_bytes(d) as usize;
                        group.load_slot(layer, slot, &data[from..from + n], key);
                        from += n;
                    }
                }
                // Blocks wholly before what the state kept hold nothing: give them back
                // before the prefix index could see them.
                let table = &mut s.tables[g];
                for blk in table.iter_mut().take(firsts[g] / b) {
                    if *blk != super::HOLE {
                        self.clock += 1;
                        group.release(*blk, self.clock);
                        *blk = super::HOLE;
                    }
                }
            }
            self.seqs[seq] = Some(s);
            self.append_tokens(seq, &tokens[start..start + count]);
            start += count;
        }
        Ok(seq)
    }
}
