//! Index micro-benchmark: how fast the SQLite actor takes scanner batches and peer
//! indexes, and how fast it answers the puller, on a 100,000-name folder on disk.
//!
//! Plain `fn main` timed with `std::time` (no harness): `cargo bench --bench index`;
//! `FERRY_BENCH_INDEX=b cargo bench --bench index` runs only the index work of
//! `bench/compare`'s scenario b (see `scenario_b`).
//! Figures are printed; the lead collects them into BENCHMARKS.md.

use std::time::{Duration, Instant};

use ferry::index::Index;
use ferry::types::{Block, DeviceId, FileInfo, FileKind, LocalChange, VersionVector};
use futures::executor::block_on;

const RECORDS: usize = 100_000;
const BATCH: usize = 1000;
const BLOCKS_PER_FILE: usize = 4;
const FOLDER: &str = "bench";
const ME: u64 = 0x1111;
const PEER: u64 = 0x2222;

fn file(i: usize, generation: u8) -> FileInfo {
    let blocks = (0..BLOCKS_PER_FILE)
        .map(|b| {
            let mut hash =
                *blake3::hash(&[&i.to_le_bytes()[..], &[b as u8, generation]].concat()).as_bytes();
            hash[0] ^= generation;
            Block {
                offset: (b * 65536) as u64,
                size: 65536,
                hash,
            }
        })
        .collect();
    FileInfo {
        name: format!("dir{:03}/sub{:02}/file{i:06}.dat", i / 1000, (i / 50) % 20),
        kind: FileKind::File,
        size: (BLOCKS_PER_FILE * 65536) as u64 + (i % 977) as u64,
        mtime_ns: 1_700_000_000_000_000_000 + i as i64 + generation as i64,
        mode: 0o644,
        deleted: false,
        version: VersionVector::new(),
        sequence: 0,
        modified_by: 0,
        blocks,
        symlink_target: None,
    }
}

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{:>9.0} records/s ({:.2} s)",
        n as f64 / d.as_secs_f64(),
        d.as_secs_f64()
    )
}

fn main() {
    // `FERRY_BENCH_INDEX=b`: scenario b's part alone (seconds instead of a minute).
    if std::env::var("FERRY_BENCH_INDEX").as_deref() == Ok("b") {
        scenario_b();
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let idx = Index::open(&dir.path().join("index.db")).expect("open index");
    block_on(idx.ensure_folder(FOLDER)).expect("folder");

    // 1. The first scan: 100k new local files, in scanner batches of 1000.
    let t = Instant::now();
    let mut committed = Vec::with_capacity(RECORDS);
    for start in (0..RECORDS).step_by(BATCH) {
        let changes = (start..start + BATCH)
            .map(|i| LocalChange {
                file: file(i, 0),
                inode: i as u64,
            })
            .collect();
        committed.extend(block_on(idx.commit_local_changes(FOLDER, ME, changes)).expect("commit"));
    }
    println!(
        "commit_local_changes, new files:       {}",
        rate(RECORDS, t.elapsed())
    );

    // 2. A rescan where nothing changed: every change is compared and skipped.
    let t = Instant::now();
    for start in (0..RECORDS).step_by(BATCH) {
        let changes = (start..start + BATCH)
            .map(|i| LocalChange {
                file: file(i, 0),
                inode: i as u64,
            })
            .collect();
        let out = block_on(idx.commit_local_changes(FOLDER, ME, changes)).expect("commit");
        assert!(out.is_empty());
    }
    println!(
        "commit_local_changes, unchanged:       {}",
        rate(RECORDS, t.elapsed())
    );

    // 3. A peer edited every file: its index arrives in batches of 1000; all are needed.
    let peer = DeviceId([7; 32]);
    let t = Instant::now();
    let mut need = 0;
    for (n, chunk) in committed.chunks(BATCH).enumerate() {
        let records = chunk
            .iter()
            .enumerate()
            .map(|(k, local)| FileInfo {
                version: local.version.bump(PEER),
                sequence: (n * BATCH + k + 1) as i64,
                modified_by: PEER,
                ..file(n * BATCH + k, 1)
            })
            .collect();
        need = block_on(idx.apply_remote(FOLDER, peer, 42, records)).expect("apply");
    }
    println!(
        "apply_remote, all newer:               {}",
        rate(RECORDS, t.elapsed())
    );
    assert_eq!(need, RECORDS as u64);

    // 4. The puller's view of a 100k need list.
    let t = Instant::now();
    let first = block_on(idx.need_list(FOLDER, 1000)).expect("need");
    let d = t.elapsed();
    assert_eq!(first.len(), 1000);
    println!(
        "need_list(1000) over 100k needed:      {:>9.2} ms ({:.0} items/s)",
        d.as_secs_f64() * 1e3,
        1000.0 / d.as_secs_f64()
    );
    let t = Instant::now();
    for _ in 0..100 {
        block_on(idx.need_list(FOLDER, 10)).expect("need");
    }
    println!(
        "need_list(10), mean of 100:            {:>9.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / 100.0
    );

    let t = Instant::now();
    let counts = block_on(idx.counts(FOLDER)).expect("counts");
    println!(
        "counts over 100k:                      {:>9.2} ms ({} needed)",
        t.elapsed().as_secs_f64() * 1e3,
        counts.need_files
    );
    let t = Instant::now();
    block_on(idx.device_completion(FOLDER, peer)).expect("completion");
    println!(
        "device_completion over 100k:           {:>9.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let hashes: Vec<[u8; 32]> = committed
        .iter()
        .step_by(100)
        .map(|f| f.blocks[2].hash)
        .collect();
    let t = Instant::now();
    for h in &hashes {
        assert!(!block_on(idx.find_block(*h)).expect("find").is_empty());
    }
    println!(
        "find_block, mean of {}:              {:>9.3} ms",
        hashes.len(),
        t.elapsed().as_secs_f64() * 1e3 / hashes.len() as f64
    );

    // 5. The puller records what it pulled, one file per command as it finishes them.
    let t = Instant::now();
    let n = 5000;
    for item in block_on(idx.need_list(FOLDER, n)).expect("need") {
        block_on(idx.commit_pulled(FOLDER, item.global, 1)).expect("pulled");
    }
    println!(
        "commit_pulled, one per transaction:    {}",
        rate(n, t.elapsed())
    );

    // 5b. As the puller records small files: pages of 1024 in one transaction each.
    let t = Instant::now();
    let n = 10 * 1024;
    let items = block_on(idx.need_list(FOLDER, n)).expect("need");
    assert_eq!(items.len(), n);
    let mut items = items.into_iter();
    for _ in 0..10 {
        let page: Vec<_> = items.by_ref().take(1024).map(|i| (i.global, 1)).collect();
        for r in block_on(idx.commit_pulled_batch(FOLDER, page)).expect("pulled") {
            r.expect("recorded");
        }
    }
    println!(
        "commit_pulled_batch, pages of 1024:    {}",
        rate(n, t.elapsed())
    );

    // 6. The peer rebuilt its database: all its records are dropped.
    let t = Instant::now();
    block_on(idx.apply_remote(FOLDER, peer, 43, Vec::new())).expect("reset");
    println!(
        "apply_remote, new index ID drops all:  {}",
        rate(RECORDS, t.elapsed())
    );

    let t = Instant::now();
    block_on(idx.close()).expect("close");
    println!(
        "close (checkpoint):                    {:>9.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    scenario_b();
}

/// The index work of one run of `bench/compare`'s scenario b (10,000 new files of one
/// block each, in 100 directories), on two fresh databases: A records its scan, B stores
/// A's index and then records each file as pulled (pages of 1,024), and A stores B's
/// announcement of the same files. The best of five rounds, each phase on its own.
fn scenario_b() {
    const N: usize = 10_000;
    let small = |i: usize| {
        let hash = *blake3::hash(&i.to_le_bytes()).as_bytes();
        FileInfo {
            name: format!("small/d{:04}/f{i:05}.bin", i / 100),
            kind: FileKind::File,
            size: 4096,
            mtime_ns: 1_700_000_000_000_000_000 + i as i64,
            mode: 0o644,
            deleted: false,
            version: VersionVector::new(),
            sequence: 0,
            modified_by: 0,
            blocks: vec![Block {
                offset: 0,
                size: 4096,
                hash,
            }],
            symlink_target: None,
        }
    };
    let (dev_a, dev_b) = (DeviceId([0xA; 32]), DeviceId([0xB; 32]));
    let mut best = [Duration::MAX; 4];
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = Index::open(&dir.path().join("a.db")).expect("open A");
        let b = Index::open(&dir.path().join("b.db")).expect("open B");
        block_on(a.ensure_folder(FOLDER)).expect("folder");
        block_on(b.ensure_folder(FOLDER)).expect("folder");

        let t = Instant::now();
        let mut scanned = Vec::with_capacity(N);
        for start in (0..N).step_by(BATCH) {
            let changes = (start..start + BATCH)
                .map(|i| LocalChange {
                    file: small(i),
                    inode: i as u64,
                })
                .collect();
            scanned.extend(block_on(a.commit_local_changes(FOLDER, ME, changes)).expect("scan"));
        }
        let d_scan = t.elapsed();

        let t = Instant::now();
        for chunk in scanned.chunks(BATCH) {
            block_on(b.apply_remote(FOLDER, dev_a, 1, chunk.to_vec())).expect("apply on B");
        }
        let d_apply = t.elapsed();

        let t = Instant::now();
        let mut pulled = Vec::with_capacity(N);
        loop {
            let page = block_on(b.need_list(FOLDER, 1024)).expect("need");
            if page.is_empty() {
                break;
            }
            let page = page.into_iter().map(|i| (i.global, 1)).collect();
            for r in block_on(b.commit_pulled_batch(FOLDER, page)).expect("pulled") {
                pulled.push(r.expect("recorded"));
            }
        }
        let d_pull = t.elapsed();
        assert_eq!(pulled.len(), N);

        let t = Instant::now();
        for chunk in pulled.chunks(BATCH) {
            block_on(a.apply_remote(FOLDER, dev_b, 2, chunk.to_vec())).expect("echo on A");
        }
        let d_echo = t.elapsed();
        assert_eq!(block_on(a.counts(FOLDER)).expect("counts").need_files, 0);
        assert_eq!(
            block_on(a.device_completion(FOLDER, dev_b)).expect("completion"),
            100.0
        );

        for (b, d) in best.iter_mut().zip([d_scan, d_apply, d_pull, d_echo]) {
            *b = (*b).min(d);
        }
    }
    println!("scenario b's index work, 10,000 small files, best of 5:");
    println!(
        "  A records its scan:                  {}",
        rate(N, best[0])
    );
    println!(
        "  B stores A's index:                  {}",
        rate(N, best[1])
    );
    println!(
        "  B records the pulled files:          {}",
        rate(N, best[2])
    );
    println!(
        "  A stores B's announcement:           {}",
        rate(N, best[3])
    );
    let total: Duration = best.iter().sum();
    println!(
        "  all four:                            {:>9.1} ms",
        total.as_secs_f64() * 1e3
    );
}
