//! The prefix index: full KV blocks found by the tokens they hold. A block's key hashes its
//! parent's key with its own tokens, so one key names a whole token prefix and a lookup walks
//! the chain block by block. Nodes keep their tokens and parent key, so a hash collision can
//! never hand out another prefix's keys and values.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// The parent key of a sequence's first block.
pub(super) const ROOT: u64 = 0x6564_6765_6c6d_0001;

/// The key of the block holding `tokens` after the prefix named by `parent`.
pub(super) fn chain_key(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: the same key in every process, so keys could be saved.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub(super) struct Node {
    pub parent: u64,
    pub tokens: Box<[u32]>,
    /// Per layer group, the block holding these positions; `HOLE` once evicted.
    pub blocks: Vec<u32>,
}

#[derive(Debug, Default)]
pub(super) struct PrefixIndex {
    nodes: HashMap<u64, Node>,
}

impl PrefixIndex {
    /// The node for `tokens` after `parent`, if cached.
    pub fn get(&self, parent: u64, tokens: &[u32]) -> Option<(u64, &Node)> {
        let key = chain_key(parent, tokens);
        self.nodes
            .get(&key)
            .filter(|n| n.parent == parent && *n.tokens == *tokens)
            .map(|n| (key, n))
    }

    pub fn node_mut(&mut self, key: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&key)
    }

    pub fn insert(&mut self, key: u64, node: Node) {
        self.nodes.insert(key, node);
    }

    /// Group `group`'s block of node `key` was evicted; the node goes once it holds none.
    pub fn forget_block(&mut self, key: u64, group: usize) {
        if let Some(n) = self.nodes.get_mut(&key) {
            n.blocks[group] = super::HOLE;
            if n.blocks.iter().all(|&b| b == super::HOLE) {
                self.nodes.remove(&key);
            }
        }
    }
}
