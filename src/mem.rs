//! Giving the allocator's free memory back to the system after large jobs.
//!
//! A job over many names (a pull of a million small files, a scan of them) allocates
//! and frees memory for each on several threads. glibc keeps what is freed inside its
//! arenas, in chunks scattered between live ones, so it cannot shrink them from the top.
//! In `bench/compare` h with a pre-seeded pair of 1,000,000 files, the pulling daemon
//! still held 191–206 MiB after the pull was over, 39 MB of it in use, and
//! `malloc_trim` brought it back to 61–69 MiB (BENCHMARKS.md, "This session: h's
//! pulling daemon's memory"). So such jobs count their names here ([`handled`]), and
//! every [`TRIM_EVERY`] of them, and at the end of such a job ([`job_done`]), the free
//! pages go back to the kernel.
//!
//! Elsewhere than on glibc this does nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Names handled between two trims during a long job: a trim (it walks the free lists)
/// every second or so of a fast pull.
pub const TRIM_EVERY: usize = 8192;
/// At the end of a job, the names it must have handled since the last trim for one more.
pub const SETTLE_MIN: usize = 1024;

static CHURN: Churn = Churn::new();

/// Names handled since the last trim.
struct Churn(AtomicUsize);

impl Churn {
    const fn new() -> Self {
        Self(AtomicUsize::new(0))
    }

    fn add(&self, n: usize) -> bool {
        self.0.fetch_add(n, Ordering::Relaxed) + n >= TRIM_EVERY
    }

    fn settle(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= SETTLE_MIN
    }

    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Counts `n` names handled by a job that is still going; every [`TRIM_EVERY`] of them,
/// trims (in the background).
pub fn handled(n: usize) {
    if CHURN.add(n) {
        trim_in_background();
    }
}

/// A job that went through many names has ended: trims (in the background) if it handled
/// at least [`SETTLE_MIN`] since the last trim.
pub fn job_done() {
    if CHURN.settle() {
        trim_in_background();
    }
}

/// Starts the count again and gives the free pages of every arena back to the kernel, on
/// a blocking thread (the trim walks the arenas' free lists under their locks), not
/// waited for.
fn trim_in_background() {
    CHURN.reset();
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(release)),
        Err(_) => drop(release()),
    }
}

/// Gives the free pages of every arena back to the kernel; true if any went back.
fn release() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_after_enough_names_and_the_count_starts_again() {
        let c = Churn::new();
        assert!(!c.settle());
        assert!(!c.add(SETTLE_MIN - 1));
        assert!(!c.settle());
        assert!(!c.add(1));
        assert!(
            c.settle(),
            "{SETTLE_MIN} names make a trim at the end worth it"
        );
        assert!(c.add(TRIM_EVERY - SETTLE_MIN));
        c.reset();
        assert!(!c.settle());
        assert!(!c.add(TRIM_EVERY - 1));
        assert!(c.add(1));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn free_memory_between_live_chunks_goes_back() {
        // 64 MiB in 4 KiB chunks (from the heap, not mapped on their own), all freed but
        // every 256th: the free runs between the live chunks cannot be trimmed from the
        // top, only by malloc_trim.
        let mut chunks: Vec<Vec<u8>> = (0..16_384).map(|i| vec![i as u8; 4096]).collect();
        let kept: Vec<Vec<u8>> = chunks
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 256 == 255)
            .map(|(_, c)| std::mem::take(c))
            .collect();
        drop(chunks);
        assert!(release(), "free pages between live chunks were given back");
        assert_eq!(kept.len(), 64);
        assert!(kept.iter().all(|c| c.len() == 4096));
    }
}
