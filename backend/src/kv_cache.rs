//! Where do a decoder's keys and values live between steps? A paged cache: per layer, one
//! tensor of keys and one of values on the model's device, cut into blocks of a fixed
//! number of positions that are handed out to sequences as they grow and given back when
//! they end or are preempted, so that memory follows the tokens actually held, not the
//! longest context a sequence might reach.
//!
//! This module keeps the books (which blocks are free, which belong to whom); the decoder's
//! forward pass writes and reads the rows, and the engine's scheduler decides who gets
//! blocks. It imports neither: they build on it. It never computes anything.

use crate::device::{Device, DeviceError, Tensor};

/// Key/value memory for many sequences: per layer, a tensor of `blocks · block_size` rows
/// for keys and one for values, handed out to sequences a block at a time.
pub struct KvCache<S> {
    k: Vec<Tensor<S>>,
    v: Vec<Tensor<S>>,
    block_size: usize,
    blocks: usize,
    /// Free block ids; taken from the end.
    free: Vec<u32>,
}

/// A sequence's place in a [`KvCache`]: its block table and how many positions it holds.
#[derive(Debug, Default)]
pub struct SeqCache {
    blocks: Vec<u32>,
    len: usize,
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
            block_size,
            blocks,
            free: (0..blocks as u32).rev().collect(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Makes room in `seq` for `tokens` more positions. False, with nothing taken, when
    /// too few blocks are free: the engine then waits or preempts.
    pub fn reserve(&mut self, seq: &mut SeqCache, tokens: usize) -> bool {
        let needed = (seq.len + tokens).div_ceil(self.block_size);
        let more = needed.saturating_sub(seq.blocks.len());
        if more > self.free.len() {
            return false;
        }
        let at = self.free.len() - more;
        seq.blocks.extend(self.free.drain(at..).rev());
        true
    }

    /// Forgets `seq`'s positions from `len` on (tokens drafted for it that turned out
    /// wrong), giving back the blocks that no longer hold any. Their rows are left as they
    /// are: a forward pass writes a position before anything reads it.
    pub fn truncate(&mut self, seq: &mut SeqCache, len: usize) {
        assert!(len <= seq.len, "truncating {} positions to {len}", seq.len);
        seq.len = len;
        let keep = len.div_ceil(self.block_size);
        self.free.extend(seq.blocks.drain(keep..).rev());
    }

    /// Gives all of `seq`'s blocks back and empties it.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.free.extend(seq.blocks.drain(..).rev());
        seq.len = 0;
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
        let mut cache: KvCache<Vec<f32>> = KvCache {
            k: Vec::new(),
            v: Vec::new(),
            block_size: 4,
            blocks: 5,
            free: (0..5).rev().collect(),
        };
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
}
