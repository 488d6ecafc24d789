//! Block buffers kept for reuse.
//!
//! A large transfer moves thousands of blocks of 64 KiB to 1 MiB, each in a buffer of its
//! own: read from the file and written to the stream on the sending side, read from the
//! stream and written to the temp file on the receiving side. Freed one by one, those
//! buffers went back to the kernel (glibc trims its heaps), and the next one was faulted in
//! again page by page: about a tenth of each daemon's CPU time in a 1 GiB transfer. The
//! pool keeps a bounded number of them instead.
//!
//! A buffer taken from the pool holds old bytes: the callers overwrite what they use
//! ([`take_filled`] for reads into an initialised slice, [`take_empty`] for reads into
//! spare capacity). Buffers are returned with [`give`]; a buffer that is never returned is
//! simply freed.

use std::sync::Mutex;

/// Total capacity the pool keeps at most. A few blocks are enough for the churn of a
/// transfer; more only raised the daemons' peak memory (2 MiB gave the same CPU time as
/// 6 MiB in `bench/compare` a, and 2–3 MiB less peak RSS).
const POOL_BYTES: usize = 2 << 20;
/// Buffers the pool keeps at most.
const POOL_COUNT: usize = 16;
/// Smaller buffers are not worth keeping: malloc serves them from memory it keeps anyway.
const MIN_KEPT: usize = 32 << 10;
/// New buffers are rounded up to this, so a buffer fits blocks of nearby sizes too.
const ROUND: usize = 64 << 10;
/// Larger buffers are not kept (a block is at most 1 MiB, plus one spare byte).
const MAX_KEPT: usize = (1 << 20) + ROUND;

static POOL: Mutex<Pool> = Mutex::new(Pool::new(POOL_BYTES, POOL_COUNT));

/// A buffer of exactly `len` initialised bytes with unspecified contents.
pub fn take_filled(len: usize) -> Vec<u8> {
    let mut buf = take_any(len);
    // Cuts a longer buffer; zeroes only the bytes a shorter one never held.
    buf.resize(len, 0);
    buf
}

/// An empty buffer with room for at least `cap` bytes without growing.
pub fn take_empty(cap: usize) -> Vec<u8> {
    let mut buf = take_any(cap);
    buf.clear();
    buf
}

/// Returns a buffer to the pool, or frees it when the pool is full or the buffer is too
/// small or too large to be worth keeping.
pub fn give(buf: Vec<u8>) {
    if let Ok(mut pool) = POOL.lock() {
        pool.give(buf);
    }
}

/// A pooled buffer with room for `len` bytes, or a new one. Small requests get a buffer
/// of their own, so a 4 KiB block never holds a pooled 256 KiB one.
fn take_any(len: usize) -> Vec<u8> {
    if len < MIN_KEPT {
        return Vec::with_capacity(len);
    }
    let pooled = POOL.lock().ok().and_then(|mut pool| pool.take(len));
    pooled.unwrap_or_else(|| Vec::with_capacity(len.div_ceil(ROUND) * ROUND))
}

/// The kept buffers, within a total capacity and a count.
struct Pool {
    bufs: Vec<Vec<u8>>,
    max_bytes: usize,
    max_count: usize,
}

impl Pool {
    const fn new(max_bytes: usize, max_count: usize) -> Self {
        Pool {
            bufs: Vec::new(),
            max_bytes,
            max_count,
        }
    }

    /// The smallest kept buffer with room for `len` bytes.
    fn take(&mut self, len: usize) -> Option<Vec<u8>> {
        let i = (0..self.bufs.len())
            .filter(|&i| self.bufs[i].capacity() >= len)
            .min_by_key(|&i| self.bufs[i].capacity())?;
        Some(self.bufs.swap_remove(i))
    }

    /// Keeps `buf` if its size is worth it, making room by dropping smaller buffers, the
    /// smallest first. Never larger ones: a big buffer serves every request a small one
    /// does. When even that would not make room, nothing changes and `buf` is freed.
    fn give(&mut self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if !(MIN_KEPT..=MAX_KEPT).contains(&cap) {
            return;
        }
        let mut smaller: Vec<usize> = (0..self.bufs.len())
            .filter(|&i| self.bufs[i].capacity() < cap)
            .collect();
        smaller.sort_unstable_by_key(|&i| self.bufs[i].capacity());
        let (mut count, mut total) = (
            self.bufs.len(),
            self.bufs.iter().map(Vec::capacity).sum::<usize>(),
        );
        let mut evict = 0;
        while count >= self.max_count || total + cap > self.max_bytes {
            let Some(&i) = smaller.get(evict) else { return };
            total -= self.bufs[i].capacity();
            count -= 1;
            evict += 1;
        }
        let mut gone = smaller[..evict].to_vec();
        gone.sort_unstable_by(|a, b| b.cmp(a)); // remove from the back: indices stay valid
        for i in gone {
            self.bufs.swap_remove(i);
        }
        self.bufs.push(buf);
    }

    #[cfg(test)]
    fn capacities(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self.bufs.iter().map(Vec::capacity).collect();
        c.sort_unstable();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 1 << 10;

    #[test]
    fn the_smallest_fitting_buffer_is_taken_with_its_old_bytes() {
        let mut pool = Pool::new(4 << 20, 8);
        for cap in [512 * K, 128 * K, 256 * K] {
            let mut b = Vec::with_capacity(cap);
            b.resize(cap / 2, 7u8);
            pool.give(b);
        }
        let b = pool.take(200 * K).unwrap();
        assert_eq!(b.capacity(), 256 * K);
        assert!(b.len() == 128 * K && b.iter().all(|&x| x == 7));
        assert_eq!(pool.take(600 * K), None);
        assert_eq!(pool.capacities(), vec![128 * K, 512 * K]);
    }

    #[test]
    fn the_pool_stays_within_its_bounds_and_keeps_the_larger_buffers() {
        let mut pool = Pool::new(1 << 20, 3);
        // Too small, too large: not kept.
        pool.give(Vec::with_capacity(K));
        pool.give(Vec::with_capacity(2 << 20));
        assert!(pool.capacities().is_empty());
        for cap in [64 * K, 128 * K, 192 * K, 256 * K] {
            pool.give(Vec::with_capacity(cap));
        }
        // The count bound dropped the smallest.
        assert_eq!(pool.capacities(), vec![128 * K, 192 * K, 256 * K]);
        // The byte bound (1 MiB) makes a 768 KiB buffer push out the two smallest ones.
        pool.give(Vec::with_capacity(768 * K));
        assert_eq!(pool.capacities(), vec![256 * K, 768 * K]);
        // When only dropping a larger buffer would make room, nothing changes.
        pool.give(Vec::with_capacity(300 * K));
        pool.give(Vec::with_capacity(64 * K));
        assert_eq!(pool.capacities(), vec![256 * K, 768 * K]);
        // Taking one makes room again.
        assert_eq!(pool.take(100 * K).map(|b| b.capacity()), Some(256 * K));
        pool.give(Vec::with_capacity(64 * K));
        assert_eq!(pool.capacities(), vec![64 * K, 768 * K]);
    }

    #[test]
    fn taken_buffers_have_the_asked_length_or_room() {
        let b = take_filled(200_000);
        assert_eq!(b.len(), 200_000);
        assert_eq!(b.capacity() % ROUND, 0);
        give(b);
        assert_eq!(take_filled(150_000).len(), 150_000);
        let e = take_empty(300_000);
        assert!(e.is_empty() && e.capacity() >= 300_000);
        assert!(take_empty(1000).capacity() < MIN_KEPT);
    }
}
