//! Convergence under stress: several devices edit one folder at once — create, modify,
//! delete, rename, nested directories, empty directories — for a bounded number of
//! operations, then go quiet. Afterwards every folder must be identical and no content
//! may be lost that nobody deleted or replaced.
//!
//! "Not lost" is checked conservatively: a write of content C to name N is *protected*
//! when no device touched N again after it (no write, deletion, rename from or to N, no
//! removal of a directory above N). A protected content must end up on every device, at
//! N or in a conflict copy of N (`stem.sync-conflict-….ext` in the same directory): it
//! is either the newest thing ever written there, or it lost a conflict and was kept.
//!
//! Every run is seeded (the seed is printed) and bounded in operations and time.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

/// What one operation did, for the loss check.
#[derive(Debug, Clone)]
enum Touch {
    /// Wrote `content` to the name (directly, so the test knows exactly what it wrote).
    Write(String, Vec<u8>),
    /// Anything else that changed the name: deleted, renamed away, overwritten by a rename.
    Other(String),
    /// Removed a directory and everything below it.
    RemoveDir(String),
}

#[derive(Debug, Clone)]
struct Op {
    side: usize,
    /// When the operation started (for "touched later") ...
    start: Instant,
    /// ... and when it was done.
    end: Instant,
    touch: Touch,
}

/// The names the devices fight over: some shared by all, some private to each device
/// (so a good part of the writes is protected), in nested directories.
fn names(side: usize, sides: usize) -> (Vec<String>, Vec<String>) {
    let mut shared = Vec::new();
    for i in 0..6 {
        shared.push(format!("s{i}.txt"));
    }
    for d in 0..3 {
        for i in 0..4 {
            shared.push(format!("d{d}/s{i}.txt"));
        }
    }
    for i in 0..3 {
        shared.push(format!("d0/deep/er/s{i}.bin"));
    }
    let mut private = Vec::new();
    for i in 0..8 {
        private.push(format!("p{side}-{i}.txt"));
    }
    for d in 0..3 {
        for i in 0..3 {
            private.push(format!("d{d}/p{side}-{i}.md"));
        }
    }
    let _ = sides;
    (shared, private)
}

/// Unique content: a header naming the writer, then pseudo-random bytes of a size that
/// is mostly small, sometimes several chunks.
fn content(rng: &mut StdRng, side: usize, op: usize) -> Vec<u8> {
    let len = match rng.gen_range(0..100) {
        0..=69 => rng.gen_range(0..4_000),
        70..=92 => rng.gen_range(4_000..100_000),
        _ => rng.gen_range(100_000..700_000),
    };
    let mut out = format!("side {side} op {op}\n").into_bytes();
    out.extend(data(rng.gen(), len));
    out
}

/// One device's random operations on its folder.
fn run_side(
    root: PathBuf,
    side: usize,
    sides: usize,
    seed: u64,
    ops: usize,
    log: Arc<Mutex<Vec<Op>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (side as u64 + 1).wrapping_mul(0x9E37_79B9));
    let (shared, private) = names(side, sides);
    let pick = |rng: &mut StdRng| -> String {
        if rng.gen_bool(0.45) {
            shared[rng.gen_range(0..shared.len())].clone()
        } else {
            private[rng.gen_range(0..private.len())].clone()
        }
    };
    let record = |start: Instant, touch: Touch| {
        log.lock().unwrap().push(Op {
            side,
            start,
            end: Instant::now(),
            touch,
        });
    };
    for i in 0..ops {
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..130)));
        let start = Instant::now();
        let roll = rng.gen_range(0..100);
        let name = pick(&mut rng);
        let path = root.join(&name);
        match roll {
            // Create or overwrite, in place or by rename from a scratch file.
            0..=54 => {
                let c = content(&mut rng, side, i);
                if let Some(parent) = path.parent() {
                    if fs::create_dir_all(parent).is_err() {
                        continue; // a file where a directory should be: skip
                    }
                }
                let ok = if rng.gen_bool(0.5) {
                    fs::write(&path, &c).is_ok()
                } else {
                    // Outside the folder, on the same file system.
                    let scratch = root.with_file_name(format!("scratch-{side}"));
                    fs::write(&scratch, &c).is_ok() && fs::rename(&scratch, &path).is_ok()
                };
                if ok {
                    record(start, Touch::Write(name, c));
                }
            }
            // Delete.
            55..=69 => {
                if fs::remove_file(&path).is_ok() {
                    record(start, Touch::Other(name));
                }
            }
            // Rename to a name that is free here.
            70..=84 => {
                let to = pick(&mut rng);
                let to_path = root.join(&to);
                if to == name || to_path.exists() || !path.is_file() {
                    continue;
                }
                if let Some(parent) = to_path.parent() {
                    if fs::create_dir_all(parent).is_err() {
                        continue;
                    }
                }
                if fs::rename(&path, &to_path).is_ok() {
                    record(start, Touch::Other(name));
                    record(start, Touch::Other(to));
                }
            }
            // Append in place.
            85..=92 => {
                use std::io::Write;
                if let Ok(mut f) = fs::OpenOptions::new().append(true).open(&path) {
                    if f.write_all(format!("appended by {side} op {i}\n").as_bytes())
                        .is_ok()
                    {
                        record(start, Touch::Other(name));
                    }
                }
            }
            // An empty directory appears or goes.
            93..=97 => {
                let d = root.join(format!("empty{}", rng.gen_range(0..3)));
                if d.is_dir() {
                    let _ = fs::remove_dir(&d);
                } else {
                    let _ = fs::create_dir_all(&d);
                }
            }
            // Rarely: a whole directory tree goes.
            _ => {
                let d = format!("d{}", rng.gen_range(1..3));
                if root.join(&d).is_dir() {
                    // Recorded even when it fails: it may have removed part of the tree
                    // before the puller put something new in it (ENOTEMPTY).
                    let _ = fs::remove_dir_all(root.join(&d));
                    record(start, Touch::RemoveDir(d));
                }
            }
        }
    }
}

fn touches(t: &Touch, name: &str) -> bool {
    match t {
        Touch::Write(n, _) | Touch::Other(n) => n == name,
        Touch::RemoveDir(d) => name.starts_with(&format!("{d}/")),
    }
}

/// Conflict copies of `name` in the final tree (any depth of conflict-of-conflict).
fn copies_of<'a>(
    tree: &'a BTreeMap<String, Vec<u8>>,
    name: &str,
) -> impl Iterator<Item = (&'a String, &'a Vec<u8>)> {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (name[..=i].to_string(), &name[i + 1..]),
        None => (String::new(), name),
    };
    let stem = match base.rfind('.') {
        Some(i) if i > 0 => &base[..i],
        _ => base,
    };
    let prefix = format!("{dir}{stem}.sync-conflict-");
    tree.iter()
        .filter(move |(k, _)| k.starts_with(&prefix) && !k[dir.len()..].contains('/'))
}

/// Runs the stress scenario on `n` devices and checks the outcome. With `crash`, the
/// last device is killed (SIGKILL) a few seconds in and restarted two seconds later,
/// while its folder keeps being edited.
fn stress(n: usize, seed: u64, ops_per_side: usize, crash: bool) {
    eprintln!("stress: {n} devices, {ops_per_side} ops each, seed {seed}, crash {crash}");
    let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (mut nodes, roots) = mesh(&refs, "f");
    let log = Arc::new(Mutex::new(Vec::new()));
    let began = Instant::now();
    let workers: Vec<_> = roots
        .iter()
        .enumerate()
        .map(|(side, root)| {
            let (root, log) = (root.clone(), log.clone());
            std::thread::spawn(move || run_side(root, side, n, seed, ops_per_side, log))
        })
        .collect();
    if crash {
        std::thread::sleep(Duration::from_secs(4));
        nodes[n - 1].kill();
        std::thread::sleep(Duration::from_secs(2));
        nodes[n - 1].start();
    }
    for w in workers {
        w.join().expect("operations thread");
    }
    let ops = log.lock().unwrap().clone();
    eprintln!(
        "stress: {} recorded operations in {:?}",
        ops.len(),
        began.elapsed()
    );
    let quiet = Instant::now();
    let fin = match std::panic::catch_unwind(|| {
        wait_identical(&roots, Duration::from_secs(90), Duration::from_secs(3))
    }) {
        Ok(t) => t,
        Err(e) => {
            // What the devices did to the names that differ.
            let trees: Vec<_> = roots.iter().map(|r| tree(r)).collect();
            for name in trees[0]
                .keys()
                .chain(trees.iter().skip(1).flat_map(|t| t.keys()))
            {
                if trees.iter().all(|t| t.get(name) == trees[0].get(name)) {
                    continue;
                }
                for o in ops
                    .iter()
                    .filter(|o| touches(&o.touch, name.trim_end_matches('/')))
                {
                    eprintln!(
                        "stress: {name}: n{} at {:?}: {}",
                        o.side,
                        o.start.duration_since(began),
                        match &o.touch {
                            Touch::Write(_, c) => format!("wrote {} bytes", c.len()),
                            Touch::Other(_) => "changed (delete/rename/append)".into(),
                            Touch::RemoveDir(d) => format!("removed {d}/"),
                        }
                    );
                }
            }
            keep_for_inspection(&nodes);
            std::panic::resume_unwind(e)
        }
    };
    let copies: Vec<&String> = fin
        .keys()
        .filter(|k| k.contains(".sync-conflict-"))
        .collect();
    // A conflict copy whose content is also somewhere else: kept twice (harmless, noisy).
    let twice = copies
        .iter()
        .filter(|k| {
            fin.iter()
                .any(|(o, v)| o != **k && v == &fin[**k] && !o.ends_with('/'))
        })
        .count();
    eprintln!(
        "stress: identical {:?} after the operations stopped: {} entries, {} conflict \
         copies ({twice} with content also kept elsewhere, {} copies of copies)",
        quiet.elapsed(),
        fin.len(),
        copies.len(),
        copies
            .iter()
            .filter(|k| k.matches(".sync-conflict-").count() > 1)
            .count()
    );

    // Nothing protected was lost.
    let mut lost = Vec::new();
    let mut lost_names = Vec::new();
    let mut protected = 0;
    for (i, op) in ops.iter().enumerate() {
        let Touch::Write(name, c) = &op.touch else {
            continue;
        };
        let later = ops
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.start >= op.start && touches(&o.touch, name));
        // An operation on the name that overlapped this one in time counts as later too.
        let overlapping = ops.iter().enumerate().any(|(j, o)| {
            j != i && o.start < op.start && o.end > op.start && touches(&o.touch, name)
        });
        if later || overlapping {
            continue;
        }
        protected += 1;
        let kept = fin.get(name) == Some(c) || copies_of(&fin, name).any(|(_, v)| v == c);
        if !kept {
            lost_names.push(name.clone());
            lost.push(format!(
                "{name} written by n{} ({} bytes), last touched then; now: {:?}, copies: {:?}",
                op.side,
                c.len(),
                fin.get(name)
                    .map(|v| String::from_utf8_lossy(&v[..v.len().min(20)]).into_owned()),
                copies_of(&fin, name)
                    .map(|(k, _)| k.clone())
                    .collect::<Vec<_>>()
            ));
        }
    }
    eprintln!("stress: {protected} protected writes checked");
    // Private names are written by one device only (others can only remove their
    // directory): a conflict copy of one would mean a conflict made up from nothing.
    let private_copies: Vec<&&String> = copies
        .iter()
        .filter(|k| k.rsplit('/').next().is_some_and(|b| b.starts_with('p')))
        .collect();
    lost_names.extend(private_copies.iter().map(|k| original_of(k)));
    assert!(
        protected > 0,
        "no write was protected: the check checked nothing"
    );
    if !lost_names.is_empty() {
        keep_for_inspection(&nodes);
        // Only what concerns the lost names, so the report fits in a CI log's tail: the
        // operations on each, then every node's log lines that mention it.
        for name in &lost_names {
            eprintln!("stress: ---- {name} ----");
            let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            for o in ops.iter().filter(|o| {
                touches(&o.touch, name) || matches!(&o.touch, Touch::RemoveDir(d) if d == dir)
            }) {
                eprintln!(
                    "stress: op n{} at {:?}..{:?}: {}",
                    o.side,
                    o.start.duration_since(began),
                    o.end.duration_since(began),
                    match &o.touch {
                        Touch::Write(n, c) => format!(
                            "wrote {n} ({} bytes, {:?})",
                            c.len(),
                            String::from_utf8_lossy(&c[..c.len().min(16)])
                        ),
                        Touch::Other(n) => format!("changed {n}"),
                        Touch::RemoveDir(d) => format!("removed {d}/"),
                    }
                );
            }
            for node in &nodes {
                let (log, base) = (node.log(), name.rsplit('/').next().unwrap_or(name));
                for line in log.lines().filter(|l| l.contains(base)) {
                    eprintln!("stress: {}: {line}", node.name);
                }
            }
        }
        // Stopped here, so that dropping them does not print their whole logs.
        for n in nodes.iter_mut() {
            n.kill();
        }
    }
    assert!(
        private_copies.is_empty(),
        "conflict copies of names only one device writes: {private_copies:?}"
    );
    assert!(lost.is_empty(), "content lost:\n{}", lost.join("\n"));

    // No leftovers, nothing still needed.
    for (node, root) in nodes.iter().zip(&roots) {
        assert_eq!(temp_files(root), Vec::<String>::new(), "{}", node.name);
        let f = wait_for("need_files 0", Duration::from_secs(20), || {
            node.folder_status("f").filter(|f| f["need_files"] == 0)
        });
        assert_eq!(f["state"], "idle", "{}: {f}", node.name);
    }
    drop(nodes);
}

/// The name a conflict copy was made of: `d/a.sync-conflict-…-XXXXXXX.txt` → `d/a.txt`.
fn original_of(copy: &str) -> String {
    let Some((stem, rest)) = copy.split_once(".sync-conflict-") else {
        return copy.to_string();
    };
    match rest.split_once('.') {
        Some((_, ext)) => format!("{stem}.{ext}"),
        None => stem.to_string(),
    }
}

/// With `FERRY_STRESS_KEEP=DIR`, copies every node's home, folder and log there.
fn keep_for_inspection(nodes: &[Node]) {
    let Ok(dir) = std::env::var("FERRY_STRESS_KEEP") else {
        return;
    };
    for n in nodes {
        let to = std::path::Path::new(&dir).join(&n.name);
        let _ = fs::create_dir_all(&to);
        let _ = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", n.dir.path().display()))
            .arg(&to)
            .status();
    }
    eprintln!("stress: nodes kept in {dir}");
}

fn seed() -> u64 {
    std::env::var("FERRY_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

#[test]
fn two_devices_converge_under_random_concurrent_edits() {
    stress(2, seed(), 150, false);
}

#[test]
fn three_devices_converge_under_random_concurrent_edits() {
    stress(3, seed(), 120, false);
}

#[test]
fn three_devices_converge_when_one_crashes_and_restarts_mid_way() {
    stress(3, seed(), 120, true);
}

/// Files of the edge sizes around the chunker's minimum (64 KiB) and the protocol's
/// largest block (1 MiB) arrive intact through real sync.
#[test]
fn edge_sizes_arrive_intact() {
    let (_nodes, roots) = mesh(&["a", "b"], "f");
    let sizes: &[usize] = &[
        0,
        1,
        65_535,
        65_536,
        65_537,
        (1 << 20) - 1,
        1 << 20,
        (1 << 20) + 1,
        3 * (1 << 20) + 17,
        7 << 20,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        fs::write(
            roots[0].join(format!("size-{n}.bin")),
            data(i as u64 + 100, n),
        )
        .unwrap();
    }
    wait_for("edge sizes on b", Duration::from_secs(60), || {
        sizes
            .iter()
            .enumerate()
            .all(|(i, &n)| {
                fs::read(roots[1].join(format!("size-{n}.bin"))).ok()
                    == Some(data(i as u64 + 100, n))
            })
            .then_some(())
    });
    // And back: B grows each by one byte, A gets the new versions.
    for &n in sizes {
        let p = roots[1].join(format!("size-{n}.bin"));
        let mut v = fs::read(&p).unwrap();
        v.push(b'!');
        fs::write(&p, v).unwrap();
    }
    let t = wait_identical(&roots, Duration::from_secs(60), Duration::from_secs(1));
    for (i, &n) in sizes.iter().enumerate() {
        let mut want = data(i as u64 + 100, n);
        want.push(b'!');
        assert_eq!(t[&format!("size-{n}.bin")], want, "size {n}");
    }
    assert_eq!(
        t.keys().filter(|k| k.contains(".sync-conflict-")).count(),
        0,
        "{:?}",
        t.keys().collect::<Vec<_>>()
    );
}

/// A name changes kind: a file becomes a directory, a directory a file, a file a
/// symlink and back. Each change must reach the other device.
#[test]
fn a_name_changing_kind_converges() {
    let (_nodes, roots) = mesh(&["a", "b"], "f");
    let (pa, pb) = (&roots[0], &roots[1]);
    fs::write(pa.join("x"), b"a file first").unwrap();
    fs::create_dir_all(pa.join("y/inner")).unwrap();
    fs::write(pa.join("y/inner/f.txt"), b"in a dir").unwrap();
    fs::write(pa.join("z"), b"a file, then a link").unwrap();
    wait_identical(&roots, Duration::from_secs(30), Duration::from_millis(300));

    fs::remove_file(pa.join("x")).unwrap();
    fs::create_dir(pa.join("x")).unwrap();
    fs::write(pa.join("x/now-a-dir.txt"), b"x is a directory now").unwrap();
    fs::remove_dir_all(pa.join("y")).unwrap();
    fs::write(pa.join("y"), b"y is a file now").unwrap();
    fs::remove_file(pa.join("z")).unwrap();
    std::os::unix::fs::symlink("x/now-a-dir.txt", pa.join("z")).unwrap();
    let t = wait_identical(&roots, Duration::from_secs(30), Duration::from_millis(300));
    assert_eq!(t["x/now-a-dir.txt"], b"x is a directory now");
    assert_eq!(t["y"], b"y is a file now");
    assert!(t.contains_key("z@"), "{:?}", t.keys().collect::<Vec<_>>());

    // And back, from the other side.
    fs::remove_dir_all(pb.join("x")).unwrap();
    fs::write(pb.join("x"), b"a file again").unwrap();
    fs::remove_file(pb.join("z")).unwrap();
    fs::write(pb.join("z"), b"z is a file again").unwrap();
    let t = wait_identical(&roots, Duration::from_secs(30), Duration::from_millis(300));
    assert_eq!(t["x"], b"a file again");
    assert_eq!(t["z"], b"z is a file again");
}

/// Permission bits that do not travel (setuid/setgid/sticky on files; a directory the
/// owner cannot write, which the receiver opens up so it can sync into it) must not
/// come back as a "change" from the receiver and alter the sender's own files.
#[test]
fn modes_that_do_not_travel_are_not_echoed_back() {
    use std::os::unix::fs::PermissionsExt;
    let (_nodes, roots) = mesh(&["a", "b"], "f");
    let (pa, pb) = (&roots[0], &roots[1]);
    fs::create_dir(pa.join("ro")).unwrap();
    fs::write(pa.join("ro/inside.txt"), b"in a read-only dir").unwrap();
    fs::set_permissions(pa.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::write(pa.join("sticky.txt"), b"sticky").unwrap();
    fs::set_permissions(pa.join("sticky.txt"), fs::Permissions::from_mode(0o1644)).unwrap();
    wait_for("files on b", Duration::from_secs(30), || {
        fs::read(pb.join("ro/inside.txt")).ok()?;
        fs::read(pb.join("sticky.txt")).ok()
    });
    // Give an echo time to come back, then check A's own modes are untouched.
    fs::write(pa.join("marker"), b"m").unwrap();
    wait_for("marker on b", Duration::from_secs(30), || {
        fs::read(pb.join("marker")).ok()
    });
    std::thread::sleep(Duration::from_secs(2));
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode(&pa.join("ro")),
        0o555,
        "A's read-only directory was changed"
    );
    assert_eq!(
        mode(&pa.join("sticky.txt")),
        0o1644,
        "A's sticky file was changed"
    );
    let _ = fs::set_permissions(pa.join("ro"), fs::Permissions::from_mode(0o755));
}

/// A name becomes a directory (with files in it) on one device while the other edits
/// it as a file, later: both contents survive and the devices agree.
#[test]
fn a_file_edited_while_the_other_side_made_it_a_directory_converges() {
    let (mut nodes, roots) = mesh(&["a", "b"], "f");
    let (pa, pb) = (roots[0].clone(), roots[1].clone());
    fs::write(pa.join("x"), b"a file").unwrap();
    wait_identical(&roots, Duration::from_secs(30), Duration::from_millis(300));
    nodes[1].stop();
    fs::remove_file(pa.join("x")).unwrap();
    fs::create_dir(pa.join("x")).unwrap();
    fs::write(pa.join("x/child.txt"), b"a child").unwrap();
    wait_for("a indexed", Duration::from_secs(30), || {
        nodes[0]
            .folder_status("f")
            .filter(|f| f["local_files"] == 1)
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(pb.join("x"), b"edited on b, later").unwrap();
    nodes[1].start();
    let t = wait_identical(&roots, Duration::from_secs(40), Duration::from_millis(500));
    assert_eq!(
        t.get("x/child.txt").map(Vec::as_slice),
        Some(&b"a child"[..]),
        "{t:?}"
    );
    assert!(
        t.iter()
            .any(|(k, v)| k.starts_with("x.sync-conflict-") && v == b"edited on b, later"),
        "{:?}",
        t.keys().collect::<Vec<_>>()
    );
}
