//! Context shift: a full sequence drops a run of its positions after the first `keep`, and the
//! later ones move down to fill the gap — by whole blocks, so a move is a block-table edit, not a
//! copy. Moved keys still carry their old rotary angle; the model re-rotates them
//! ([`KvCache::update_keys`]) to their new positions.

use super::{needed_from, take_block, KvCache, SeqId, HOLE};
use crate::{ModelError, Result};

impl KvCache {
    /// Drop positions `keep .. keep + discard` of `seq` (`discard` a positive multiple of the
    /// block length, `keep + discard` at most its length); positions after them move down by
    /// `discard`. Fails, changing nothing, if a sliding window already released keys the
    /// shifted sequence reads.
    pub(crate) fn shift(&mut self, seq: SeqId, keep: usize, discard: usize) -> Result<()> {
        let b = self.cfg.block_len;
        let len = self.seq(seq)?.tokens.len();
        let refuse = |reason: String| ModelError::ContextShift {
            keep,
            discard,
            reason,
        };
        if discard == 0 || !discard.is_multiple_of(b) || keep + discard > len {
            return Err(refuse(format!(
                "it drops whole blocks of {b} positions from the {len} the sequence holds"
            )));
        }
        let (k0, d, off) = (keep / b, discard / b, keep % b);
        let new_len = len - discard;
        let s = self.seq(seq)?;
        // The new tables: blocks k0 .. k0 + d go; block k0 + d (which holds position
        // keep + discard at offset `off`) becomes block k0 once the kept slots 0..off of the old
        // block k0 are copied into it.
        let mut plans = Vec::with_capacity(self.groups.len());
        for (group, table) in self.groups.iter().zip(&s.tables) {
            let mut new: Vec<u32> = table[..k0].to_vec();
            let (head, merged) = match table.get(k0 + d) {
                Some(&tail) => {
                    new.push(tail);
                    new.extend_from_slice(&table[k0 + d + 1..]);
                    (table[k0], off > 0 && tail != HOLE)
                }
                // Nothing after the dropped run: block k0 keeps its first `off` slots.
                None => {
                    if off > 0 {
                        new.push(table[k0]);
                    }
                    (HOLE, false)
                }
            };
            let from = needed_from(group.window, new_len, b);
            for (i, &blk) in new.iter().enumerate().skip(from) {
                let lost_head = i == k0 && off > 0 && head == HOLE && merged;
                if blk == HOLE || lost_head {
                    return Err(refuse(format!(
                        "its sliding window ({} positions) already released keys the shifted \
                         sequence reads; give a context longer than twice the window, or keep \
                         fewer tokens",
                        group.window.unwrap_or(0)
                    )));
                }
            }
            plans.push((new, merged.then_some(head)));
        }
        let mut s = self.seqs[seq].take().expect("checked above");
        let result = self.apply_shift(&mut s, plans, k0, off);
        if result.is_ok() {
            s.tokens.drain(keep..keep + discard);
            s.keys.truncate(k0);
            s.shifted = true;
        }
        self.seqs[seq] = Some(s);
        result
    }

    /// Install the new block tables of `s`: blocks from `k0` on are written (the merge and the
    /// re-rotation), so those other sequences hold are copied to fresh ones first — taken
    /// before anything changes, so a full pool fails cleanly — and those only the prefix index
    /// sees leave it; then the kept head slots are merged and dropped blocks released.
    fn apply_shift(
        &mut self,
        s: &mut super::Seq,
        plans: Vec<(Vec<u32>, Option<u32>)>,
        k0: usize,
        off: usize,
    ) -> Result<()> {
        let b = self.cfg.block_len;
        let mut fresh = Vec::new();
        for (g, (new, _)) in plans.iter().enumerate() {
            for (i, &blk) in new.iter().enumerate().skip(k0) {
                if blk != HOLE && self.groups[g].refs(blk) > 1 {
                    match take_block(&mut self.groups, &mut self.prefix, g, b) {
                        Ok(f) => fresh.push((g, i, f)),
                        Err(e) => {
                            for (g, _, f) in fresh {
                                self.groups[g].release(f, 0);
                            }
                            return Err(e);
                        }
                    }
                }
            }
        }
        for (g, (mut new, head)) in plans.into_iter().enumerate() {
            for &(_, i, f) in fresh.iter().filter(|x| x.0 == g) {
                self.groups[g].copy_slots(new[i], f, b);
                new[i] = f;
            }
            for &blk in new.iter().skip(k0).filter(|&&b| b != HOLE) {
                if let Some(key) = self.groups[g].uncache(blk) {
                    self.prefix.forget_block(key, g);
                }
            }
            if let Some(h) = head.filter(|&h| h != HOLE) {
                self.groups[g].copy_slots(h, new[k0], off);
            }
            let kept: std::collections::HashSet<u32> = new.iter().copied().collect();
            for &blk in s.tables[g].iter().rev() {
                if blk != HOLE && !kept.contains(&blk) {
                    self.clock += 1;
                    self.groups[g].release(blk, self.clock);
                }
            }
            s.tables[g] = new;
        }
        Ok(())
    }

    /// Rewrite the key of every position from `from` on that `seq`'s layer `layer` still holds,
    /// through `f` on its values (widened from the cache type, stored back in it).
    pub(crate) fn update_keys(
        &mut self,
        seq: SeqId,
        layer: usize,
        from: usize,
        f: &mut dyn FnMut(&mut [f32]),
    ) {
        let (g, i) = self.layer_slot[layer];
        let b = self.cfg.block_len;
        let s = self.seqs[seq].as_ref().expect("shifted sequence");
        let mut row = Vec::new();
        for pos in from..s.tokens.len() {
            let blk = s.tables[g][pos / b];
            if blk != HOLE {
                self.groups[g].update_key(i, blk as usize * b + pos % b, &mut row, f);
            }
        }
    }
}
