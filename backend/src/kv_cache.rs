//! Where do a decoder's keys and values live between steps? A paged cache: per layer, one
//! tensor of keys and one of values on the model's device, cut into blocks of a fixed
//! number of positions that are handed out to sequences as they grow and given back when
//! they end or are preempted, so that memory follows the tokens actually held, not the
//! longest context a sequence might reach.
//!
//! Blocks are also kept for what they hold (automatic prefix caching): a block filled with
//! prompt tokens is registered under those tokens and the registration of the block before
//! it, so the key names the whole prefix up to it, compared exactly (no hash to collide). A
//! later sequence whose prompt starts with the same blocks takes them, shared and read-only,
//! and computes only the rest. A registered block no sequence uses is idle: taken again by
//! a match, or reused for anything, oldest first, once no block is plainly free. Only prompt
//! blocks are registered: a prompt token's keys and values are computed the same way
//! whatever was computed with them (the decoder's promise), so a shared block holds exactly
//! the bits the sequence would have computed itself.
//!
//! This module keeps the books (which blocks are free, which belong to whom); the decoder's
//! forward pass writes and reads the rows, and the engine's scheduler decides who gets
//! blocks. It imports neither: they build on it. It never computes anything.

use std::collections::{BTreeMap, HashMap};

use crate::device::{Device, DeviceError, Tensor};

/// Key/value memory for many sequences: per layer, a tensor of `blocks · block_size` rows
/// for keys and one for values, handed out to sequences a block at a time.
pub struct KvCache<S> {
    k: Vec<Tensor<S>>,
    v: Vec<Tensor<S>>,
    block_size: usize,
    blocks: usize,
    /// Block ids holding nothing worth keeping; taken from the end.
    free: Vec<u32>,
    /// Per block: how many sequences hold it.
    users: Vec<u32>,
    /// Per block: what it is registered as, if it holds a whole prompt block.
    registered: Vec<Option<Registration>>,
    /// Registered blocks by what they hold: the registration id of the block before them
    /// (0 for a prompt's first) and their tokens.
    prefixes: HashMap<(u64, Vec<u32>), u32>,
    /// Registered blocks no sequence holds, by when they were last let go.
    idle: BTreeMap<u64, u32>,
    /// A counter for registration ids and idle times; ids start at 1.
    clock: u64,
}

/// What a registered block holds.
#[derive(Debug, Clone)]
struct Registration {
    /// Never reused, so a key naming an evicted block's id can never match again.
    id: u64,
    key: (u64, Vec<u32>),
    /// When it went idle, while it is.
    idle_since: Option<u64>,
}

/// A sequence's place in a [`KvCache`]: its block table and how many positions it holds.
#[derive(Debug, Default)]
pub struct SeqCache {
    blocks: Vec<u32>,
    len: usize,
    /// Its first blocks that are registered (shared or registered by it), and the last
    /// one's registration id: where registering its next prompt block continues from.
    registered: usize,
    last_registration: u64,
}

impl SeqCache {
    /// Tokens this sequence has in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Counts `tokens` more positions as held, once a forward pass has written them into
    /// the blocks reserved for them.
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}

impl<S> KvCache<S> {
    /// An empty cache on `device` of `blocks` blocks of `block_size` positions each, for
    /// `layers` layers of `width` floats per position (key/value heads × head width).
    pub fn new<D: Device<Storage = S>>(
        device: &D,
        layers: usize,
        width: usize,
        blocks: usize,
        block_size: usize,
    ) -> Result<Self, DeviceError> {
        assert!(block_size > 0 && blocks <= u32::MAX as usize);
        let shape = [blocks * block_size, width];
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(device.zeros(&shape)?);
            v.push(device.zeros(&shape)?);
        }
        Ok(KvCache {
            k,
            v,
            ..Self::books(blocks, block_size)
        })
    }

    /// The books of an empty cache, with no rows behind them.
    fn books(blocks: usize, block_size: usize) -> Self {
        KvCache {
            k: Vec::new(),
            v: Vec::new(),
            block_size,
            blocks,
            free: (0..blocks as u32).rev().collect(),
            users: vec![0; blocks],
            registered: vec![None; blocks],
            prefixes: HashMap::new(),
            idle: BTreeMap::new(),
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    /// Blocks no sequence holds: plainly free, or idle and kept for a prefix until needed.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Makes room in `seq` for `tokens` more positions. False, with nothing taken, when
    /// too few blocks are free: the engine then waits or preempts. Plainly free blocks go
    /// first, then idle prefix blocks, the longest idle first.
    pub fn reserve(&mut self, seq: &mut SeqCache, tokens: usize) -> bool {
        let needed = (seq.len + tokens).div_ceil(self.block_size);
        let more = needed.saturating_sub(seq.blocks.len());
        if more > self.free_blocks() {
            return false;
        }
        for _ in 0..more {
            let block = match self.free.pop() {
                Some(block) => block,
                None => self.evict_oldest_idle(),
            };
            self.users[block as usize] = 1;
            seq.blocks.push(block);
        }
        true
    }

    fn evict_oldest_idle(&mut self) -> u32 {
        let (_, block) = self
            .idle
            .pop_first()
            .expect("an idle block, counted as free");
        let registration = self.registered[block as usize]
            .take()
            .expect("idle blocks are registered");
        self.prefixes.remove(&registration.key);
        block
    }

    /// Gives `seq`'s blocks from the `keep`th on back: free, or idle if registered.
    fn let_go(&mut self, seq: &mut SeqCache, keep: usize) {
        for block in seq.blocks.drain(keep..).rev().collect::<Vec<_>>() {
            let users = &mut self.users[block as usize];
            *users -= 1;
            if *users > 0 {
                continue;
            }
            match &mut self.registered[block as usize] {
                Some(registration) => {
                    self.clock += 1;
                    registration.idle_since = Some(self.clock);
                    self.idle.insert(self.clock, block);
                }
                None => self.free.push(block),
            }
        }
        seq.registered = seq.registered.min(keep);
    }

    /// Forgets `seq`'s positions from `len` on (tokens drafted for it that turned out
    /// wrong), giving back the blocks that no longer hold any. Their rows are left as they
    /// are: a forward pass writes a position before anything reads it.
    pub fn truncate(&mut self, seq: &mut SeqCache, len: usize) {
        assert!(len <= seq.len, "truncating {} positions to {len}", seq.len);
        seq.len = len;
        self.let_go(seq, len.div_ceil(self.block_size));
    }

    /// Gives all of `seq`'s blocks back and empties it.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.let_go(seq, 0);
        seq.len = 0;
        seq.last_registration = 0;
    }

    /// Starts the empty `seq` with the registered blocks that hold `prompt`'s first whole
    /// blocks, as many as match, leaving at least its last token to compute (its logits are
    /// needed). Returns the positions it now holds.
    pub fn share_prefix(&mut self, seq: &mut SeqCache, prompt: &[u32]) -> usize {
        assert!(
            seq.blocks.is_empty(),
            "sharing into a sequence that holds blocks"
        );
        let bs = self.block_size;
        let mut parent = 0;
        for tokens in prompt[..prompt.len().saturating_sub(1)].chunks_exact(bs) {
            let Some(&block) = self.prefixes.get(&(parent, tokens.to_vec())) else {
                break;
            };
            let registration = self.registered[block as usize]
                .as_mut()
                .expect("a block found by its prefix is registered");
            if let Some(since) = registration.idle_since.take() {
                self.idle.remove(&since);
            }
            parent = registration.id;
            self.users[block as usize] += 1;
            seq.blocks.push(block);
        }
        seq.len = seq.blocks.len() * bs;
        seq.registered = seq.blocks.len();
        seq.last_registration = parent;
        seq.len
    }

    /// Registers `seq`'s blocks that are now filled with `prompt` tokens and not yet
    /// registered, so later sequences can share them. A block whose prefix another block
    /// already holds stays unregistered (and so do the ones after it).
    pub fn register_prompt(&mut self, seq: &mut SeqCache, prompt: &[u32]) {
        let bs = self.block_size;
        let whole = seq.len.min(prompt.len()) / bs;
        while seq.registered < whole {
            let i = seq.registered;
            let block = seq.blocks[i];
            if self.registered[block as usize].is_some() {
                return;
            }
            let key = (seq.last_registration, prompt[i * bs..(i + 1) * bs].to_vec());
            if self.prefixes.contains_key(&key) {
                return;
            }
            self.clock += 1;
            self.prefixes.insert(key.clone(), block);
            self.registered[block as usize] = Some(Registration {
                id: self.clock,
                key,
                idle_since: None,
            });
            seq.registered += 1;
            seq.last_registration = self.clock;
        }
    }

    /// Layer `layer`'s keys and values: every block's rows, for a forward pass to write its
    /// new positions into and attend over.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut Tensor<S>, &mut Tensor<S>) {
        (&mut self.k[layer], &mut self.v[layer])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_blocks_are_reserved_as_sequences_grow_and_come_back_on_release() {
        let mut cache: KvCache<Vec<f32>> = KvCache::books(5, 4);
        let (mut a, mut b) = (SeqCache::default(), SeqCache::default());
        assert!(cache.reserve(&mut a, 5));
        assert_eq!(a.blocks(), [0, 1]);
        a.len = 5;
        // Three more positions still fit in block 1; a fourth needs block 2.
        assert!(cache.reserve(&mut a, 3));
        assert_eq!(a.blocks().len(), 2);
        assert!(cache.reserve(&mut b, 9));
        assert_eq!(b.blocks(), [2, 3, 4]);
        // Nothing is free: a request for more takes nothing.
        assert!(!cache.reserve(&mut a, 4));
        assert_eq!((a.blocks().len(), cache.free_blocks()), (2, 0));
        cache.release(&mut b);
        assert_eq!((b.blocks().len(), b.len(), cache.free_blocks()), (0, 0, 3));
        assert!(cache.reserve(&mut a, 4));
        assert_eq!(a.blocks(), [0, 1, 2]);
        // Back to 4 positions: block 1 and 2 hold none of them and come back.
        a.len = 9;
        cache.truncate(&mut a, 4);
        assert_eq!((a.blocks(), a.len(), cache.free_blocks()), (&[0][..], 4, 4));
        cache.truncate(&mut a, 3);
        assert_eq!((a.blocks(), a.len()), (&[0][..], 3));
    }

    /// A sequence that wrote its prompt's blocks: len set as a forward pass would.
    fn prefilled(cache: &mut KvCache<Vec<f32>>, prompt: &[u32]) -> SeqCache {
        let mut seq = SeqCache::default();
        let shared = cache.share_prefix(&mut seq, prompt);
        assert!(cache.reserve(&mut seq, prompt.len() - shared));
        seq.advance(prompt.len() - shared);
        cache.register_prompt(&mut seq, prompt);
        seq
    }

    #[test]
    fn a_prompts_whole_blocks_are_shared_by_the_next_sequence_that_starts_with_them() {
        let mut cache: KvCache<Vec<f32>> = KvCache::books(8, 2);
        let prompt = [1, 2, 3, 4, 5, 6, 7];
        let mut a = prefilled(&mut cache, &prompt);
        assert_eq!(a.blocks(), [0, 1, 2, 3]);
        // Same first four tokens, then different: two blocks shared, read-only.
        let mut b = SeqCache::default();
        assert_eq!(cache.share_prefix(&mut b, &[1, 2, 3, 4, 9, 9, 9]), 4);
        assert_eq!((b.blocks(), b.len()), (&[0, 1][..], 4));
        // The same prompt exactly: three whole blocks, never the last token's.
        let mut c = SeqCache::default();
        assert_eq!(cache.share_prefix(&mut c, &prompt), 6);
        // A different first block shares nothing, even if later blocks agree.
        let mut d = SeqCache::default();
        assert_eq!(cache.share_prefix(&mut d, &[9, 2, 3, 4, 5, 6, 7]), 0);
        // Let go by all, the blocks are idle, not free: still shared by the next match...
        for seq in [&mut a, &mut b, &mut c] {
            cache.release(seq);
        }
        assert_eq!(cache.free_blocks(), 8);
        let mut e = SeqCache::default();
        assert_eq!(cache.share_prefix(&mut e, &prompt), 6);
        cache.release(&mut e);
        // ...until space is needed: plainly free blocks go first, then the longest idle
        // (a prefix's last block: it was let go first).
        let mut f = SeqCache::default();
        assert!(cache.reserve(&mut f, 10));
        f.advance(10);
        assert_eq!(cache.free_blocks(), 3);
        let mut g = SeqCache::default();
        assert_eq!(
            cache.share_prefix(&mut g, &prompt),
            6,
            "idle blocks outlive free ones"
        );
        cache.release(&mut g);
        assert!(cache.reserve(&mut f, 2));
        f.advance(2);
        let mut h = SeqCache::default();
        assert_eq!(
            cache.share_prefix(&mut h, &prompt),
            4,
            "the first two blocks survive"
        );
        cache.release(&mut h);
        assert!(cache.reserve(&mut f, 4));
        assert_eq!(cache.free_blocks(), 0);
        let mut i = SeqCache::default();
        assert_eq!(
            cache.share_prefix(&mut i, &prompt),
            0,
            "evicted blocks match nothing"
        );
    }

    #[test]
    fn generated_tokens_and_partly_filled_blocks_are_never_registered() {
        let mut cache: KvCache<Vec<f32>> = KvCache::books(8, 2);
        let prompt = [1, 2, 3];
        let mut a = prefilled(&mut cache, &prompt);
        // Two generated tokens fill block 1 (3, g) and block 2 (g): none of them registers.
        assert!(cache.reserve(&mut a, 2));
        a.advance(2);
        cache.register_prompt(&mut a, &prompt);
        let mut b = SeqCache::default();
        assert_eq!(cache.share_prefix(&mut b, &[1, 2, 3, 5, 6]), 2);
        // A block dropped by a truncation goes back free, a registered one idle.
        cache.truncate(&mut a, 2);
        assert_eq!(a.blocks().len(), 1);
        cache.release(&mut b);
        cache.release(&mut a);
        assert_eq!(cache.free_blocks(), 8);
        assert_eq!(cache.idle.len(), 1);
    }
}
