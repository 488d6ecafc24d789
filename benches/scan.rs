//! Scan benchmark: chunk+hash throughput and rescan speed, with peak memory.
//!
//! Generates (once; reused if present) under `FERRY_BENCH_DIR` (default: a temp dir) one
//! large random file and a tree of many small random files, all from a fixed seed, then
//! measures for each:
//!
//! - cold scan: nothing known, everything hashed (data is in the page cache after
//!   generation: this measures the scanner, not the disk);
//! - warm scan: `known` taken from the cold scan, nothing changed (stat only).
//!
//! Each figure is the best of `FERRY_BENCH_REPEAT` runs (default 3; the machine is shared).
//! Prints MB/s, files/s and the peak RSS of each phase (VmHWM, reset between phases; the
//! warm scans include the `known` map the caller holds).
//!
//! `FERRY_BENCH_ONLY=hash|big|small` runs one part alone (its own process, its own peak).
//! Sizes are overridable so CI can run it small:
//! `FERRY_BENCH_BIG_MB` (default 1024), `FERRY_BENCH_FILES` (default 100000),
//! `FERRY_BENCH_SMALL_MAX` (largest small file in bytes, default 8192; sizes are uniform
//! in 0..=max). Run: `cargo bench --bench scan`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry::ignore::Ignores;
use ferry::scanner::{self, ScanRequest, ScanStats};
use ferry::types::{Known, LocalChange, LocalMeta};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: fast, seeded, good enough to defeat any compression or dedup.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Peak resident memory since the last reset, in MiB (Linux; 0 elsewhere).
fn peak_rss_mib() -> f64 {
    let peak = status_mib("VmHWM:");
    RUN_PEAK_KIB.fetch_max((peak * 1024.0) as u64, std::sync::atomic::Ordering::Relaxed);
    peak
}

/// The highest peak read so far: the peak of the whole run across the per-phase resets.
static RUN_PEAK_KIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU time (user + system) this process has used so far, in seconds: unlike wall time it
/// barely depends on what else the (shared) machine runs.
fn cpu_secs() -> f64 {
    #[cfg(unix)]
    {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct we own.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            return tv(ru.ru_utime) + tv(ru.ru_stime);
        }
    }
    0.0
}

/// Current resident memory in MiB (Linux; 0 elsewhere).
fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// Returns freed heap to the OS and resets VmHWM to the current RSS (Linux >= 4.0), so each
/// phase reports its own peak rather than what an earlier phase left in the allocator.
fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn generate(root: &Path, big_mb: u64, files: u64, small_max: u64) -> std::io::Result<()> {
    let marker = root.join(format!("generated-{big_mb}-{files}-{small_max}"));
    if marker.exists() {
        eprintln!("reusing data in {}", root.display());
        return Ok(());
    }
    eprintln!(
        "generating {big_mb} MiB file and {files} small files in {}",
        root.display()
    );
    let _ = std::fs::remove_dir_all(root.join("big"));
    let _ = std::fs::remove_dir_all(root.join("small"));
    std::fs::create_dir_all(root.join("big"))?;
    let mut rng = Rng(0x5eed_f00d_cafe_0001);
    let mut f = std::io::BufWriter::new(std::fs::File::create(root.join("big/big.bin"))?);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..big_mb {
        rng.fill(&mut buf);
        f.write_all(&buf)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    // 1000 files per directory, directories two levels deep.
    for i in 0..files {
        let dir = root.join(format!("small/d{:02}/e{:03}", i / 10_000, (i / 1000) % 10));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let n = (rng.next() % (small_max + 1)) as usize;
        rng.fill(&mut buf[..n]);
        std::fs::write(dir.join(format!("f{i:06}.dat")), &buf[..n])?;
    }
    std::fs::write(marker, b"")?;
    Ok(())
}

fn meta_of(c: &LocalChange) -> LocalMeta {
    LocalMeta {
        kind: c.file.kind,
        size: c.file.size,
        mtime_ns: c.file.mtime_ns,
        mode: c.file.mode,
        inode: c.inode,
        deleted: c.file.deleted,
    }
}

/// One timed scan; with `keep`, what the index would record (for the next warm scan).
fn timed_scan(root: &Path, sub: &str, known: &Known, keep: bool) -> (ScanStats, f64, Usage, Known) {
    let ignores = Ignores::empty();
    let req = ScanRequest {
        root,
        subpaths: vec![sub.to_string()],
        known,
        ignores: &ignores,
        progress: None,
    };
    let mut kept = Known::new();
    reset_peak_rss();
    let before = rss_mib();
    let cpu = cpu_secs();
    let t = Instant::now();
    let stats = scanner::scan(&req, &mut |batch| {
        if keep {
            for c in &batch {
                kept.push(&c.file.name, meta_of(c));
            }
        }
        Ok(())
    })
    .expect("scan");
    let secs = t.elapsed().as_secs_f64();
    let peak = peak_rss_mib();
    let usage = Usage {
        cpu: cpu_secs() - cpu,
        peak,
        delta: peak - before,
    };
    (stats, secs, usage, kept.finish())
}

/// What one run cost besides wall time.
struct Usage {
    /// CPU seconds (all threads).
    cpu: f64,
    /// Peak RSS of the process during the run, and how much of it the run added, in MiB.
    peak: f64,
    delta: f64,
}

fn report(what: &str, s: &ScanStats, secs: f64, u: &Usage) {
    let mb = s.hashed_bytes as f64 / 1e6;
    println!(
        "{what:<24} {secs:>7.3} s  {:>6.0} MB/s  {:>7.0} entries/s  CPU {:.2} s  \
         hashed {} files / {:.0} MB  changed {}  peak RSS {:.1} MiB (+{:.1} in the scan)",
        mb / secs,
        (s.files + s.dirs) as f64 / secs,
        u.cpu,
        s.hashed_files,
        mb,
        s.changed,
        u.peak,
        u.delta,
    );
}

fn main() {
    let big_mb = env_u64("FERRY_BENCH_BIG_MB", 1024);
    let files = env_u64("FERRY_BENCH_FILES", 100_000);
    let small_max = env_u64("FERRY_BENCH_SMALL_MAX", 8192);
    let _tmp;
    let root: PathBuf = match std::env::var_os("FERRY_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            _tmp = tempfile::tempdir().expect("temp dir");
            _tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root).expect("bench dir");
    generate(&root, big_mb, files, small_max).expect("generate data");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("ferry scan benchmark: {big_mb} MiB file, {files} small files (0..={small_max} B), {cores} cores");

    let repeat = env_u64("FERRY_BENCH_REPEAT", 3).max(1);
    let none = Known::new();

    // Untimed: make sure the data is in the page cache (as right after generation), so the
    // figures measure the scanner and not the disk.
    let (warm, _, _, _) = timed_scan(&root, "", &none, false);
    eprintln!(
        "page cache warmed: {} files, {:.0} MB",
        warm.files,
        warm.bytes as f64 / 1e6
    );

    // FERRY_BENCH_ONLY=hash|big|small runs one part, in a fresh process: its peak RSS is
    // then that part's alone.
    let only = std::env::var("FERRY_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;

    // Raw chunk+hash of one file, without the walk (best of `repeat`).
    let big = root.join("big/big.bin");
    if run("hash") {
        let (mut best, mut best_cpu) = (f64::MAX, 0.0);
        let mut blocks = Vec::new();
        let mut rss = 0.0;
        for _ in 0..repeat {
            reset_peak_rss();
            let cpu = cpu_secs();
            let t = Instant::now();
            blocks = scanner::hash_file(&big).expect("hash_file");
            let secs = t.elapsed().as_secs_f64();
            if secs < best {
                (best, best_cpu) = (secs, cpu_secs() - cpu);
            }
            rss = peak_rss_mib();
        }
        let bytes: u64 = blocks.iter().map(|b| b.size as u64).sum();
        println!(
            "{:<24} {best:>7.3} s  {:>6.0} MB/s  CPU {best_cpu:.2} s  {} chunks, avg {} KiB, \
         peak RSS {rss:.1} MiB",
            "hash_file (big)",
            bytes as f64 / 1e6 / best,
            blocks.len(),
            bytes / blocks.len().max(1) as u64 / 1024,
        );
        drop(blocks);
    }

    for (label, sub) in [("big file", "big"), ("small files", "small")] {
        if !run(sub) {
            continue;
        }
        let (s, secs, rss, kept) = best_of(repeat, || timed_scan(&root, sub, &none, true));
        report(&format!("cold scan, {label}"), &s, secs, &rss);
        let (s, secs, rss, _) = best_of(repeat, || timed_scan(&root, sub, &kept, false));
        report(&format!("warm scan, {label}"), &s, secs, &rss);
        assert_eq!(s.changed, 0, "warm scan must find nothing");
    }
    peak_rss_mib();
    println!(
        "peak RSS of the whole run (measured parts): {:.1} MiB",
        RUN_PEAK_KIB.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    );
}

/// Runs `f` `n` times and keeps the fastest run's figures (the machine is shared: the best
/// run is the one least disturbed). Only the last run's output is kept, so earlier runs'
/// data do not add to the memory of later ones.
fn best_of<T, M>(n: u64, mut f: impl FnMut() -> (ScanStats, f64, M, T)) -> (ScanStats, f64, M, T) {
    let (mut stats, mut secs, mut usage, mut out) = f();
    for _ in 1..n {
        drop(out);
        let r = f();
        out = r.3;
        if r.1 < secs {
            (stats, secs, usage) = (r.0, r.1, r.2);
        }
    }
    (stats, secs, usage, out)
}
