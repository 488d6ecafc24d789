//! Helpers to run real nodes. Every node listens on 127.0.0.1 with mDNS off.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `ferry` binary under test: the one cargo built, or `FERRY_TEST_BIN` (to rerun a
/// copied test binary against a copied daemon, e.g. while hunting a flaky failure).
pub fn bin() -> String {
    std::env::var("FERRY_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferry").to_string())
}

/// A port that was free a moment ago on 127.0.0.1. Taken below Linux's ephemeral range
/// (32768–60999): a port the OS handed out for `bind(0)` and that is released again is
/// soon reused as the local end of some outgoing connection (the daemons dial each
/// other), and the daemon that was to listen there then fails to start. Each test
/// process walks its own stretch of the range, so parallel tests do not pick the same.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(97) % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free port on 127.0.0.1 between {FIRST} and {}",
        FIRST + SPAN
    )
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Node {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
}

impl Node {
    /// An initialised node (not running) with a fixed loopback TCP port.
    pub fn new(name: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        let port = free_port();
        let n = Node {
            name: name.into(),
            home,
            port,
            dir,
            child: None,
        };
        let listen = format!("/ip4/127.0.0.1/tcp/{port}");
        n.ok(&[
            "init",
            "--name",
            name,
            "--listen",
            &listen,
            "--api",
            "127.0.0.1:0",
            "--no-mdns",
        ]);
        n
    }

    pub fn addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}", self.port)
    }

    /// A directory inside this node's temp dir (created).
    pub fn path(&self, rel: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .env_remove("FERRY_HOME")
            .output()
            .expect("run ferry")
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "{}: ferry {:?} failed: {}\n{}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn id(&self) -> String {
        self.ok(&["id"]).trim().to_string()
    }

    /// Starts `ferry run` and waits until its API answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", self.name)))
            .expect("log file");
        let child = Command::new(bin())
            .arg("--home")
            .arg(&self.home)
            .args(["run", "--no-mdns"])
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_TEST_LOG")
                    .unwrap_or_else(|_| "info,ferry=debug,libp2p=warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferry run");
        self.child = Some(child);
        wait_for(
            &format!("{} to answer status", self.name),
            Duration::from_secs(20),
            || self.try_status(),
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.name)))
            .unwrap_or_default()
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = self.cmd(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("{}: status failed\n{}", self.name, self.log()))
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code();
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                panic!("{} did not stop within 15 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn device_connected(&self, id: &str) -> bool {
        self.try_status()
            .map(|s| {
                s["devices"]
                    .as_array()
                    .map(|d| d.iter().any(|d| d["id"] == id && d["connected"] == true))
                    .unwrap_or(false)
            })
            .unwrap_or(false)
    }

    pub fn folder_status(&self, id: &str) -> Option<Value> {
        let s = self.try_status()?;
        s["folders"]
            .as_array()?
            .iter()
            .find(|f| f["id"] == id)
            .cloned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            if std::thread::panicking() {
                eprintln!("---- log of {} ----\n{}", self.name, self.log());
            }
            self.kill();
        }
    }
}

/// Pairs two nodes both ways with explicit addresses (no daemon needs to run).
pub fn pair(a: &Node, b: &Node) {
    let (ida, idb) = (a.id(), b.id());
    a.ok(&[
        "device",
        "add",
        &idb,
        "--name",
        &b.name,
        "--addr",
        &b.addr(),
    ]);
    b.ok(&[
        "device",
        "add",
        &ida,
        "--name",
        &a.name,
        "--addr",
        &a.addr(),
    ]);
}

/// Shares folder `id` at `pa` on A and `pb` on B between the two (config only).
pub fn share(a: &Node, b: &Node, id: &str, pa: &Path, pb: &Path) {
    share_as(a, b, id, (pa, "send-receive"), (pb, "send-receive"));
}

/// [`share`] with a folder type on each side ("send-receive", "send-only", "receive-only").
pub fn share_as(a: &Node, b: &Node, id: &str, (pa, ta): (&Path, &str), (pb, tb): (&Path, &str)) {
    let (ida, idb) = (a.id(), b.id());
    for (n, p, t) in [(a, pa, ta), (b, pb, tb)] {
        n.ok(&[
            "folder",
            "add",
            p.to_str().unwrap(),
            "--id",
            id,
            "--type",
            t,
        ]);
    }
    a.ok(&["folder", "share", id, &idb]);
    b.ok(&["folder", "share", id, &ida]);
}

/// Every regular file under `root` (skipping .ferry), relative name -> contents.
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if rel == ".ferry" || rel.starts_with(".ferry/") {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.insert(format!("{rel}/"), vec![]);
                walk(root, &p, out);
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(format!("{rel}@"), t.to_string_lossy().as_bytes().to_vec());
            } else {
                out.insert(rel, std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// Deterministic pseudo-random bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Bytes `n` has received from the node with ID `from` since `n` started.
pub fn bytes_in_from(n: &Node, from: &str) -> u64 {
    n.try_status()
        .and_then(|st| {
            st["devices"]
                .as_array()?
                .iter()
                .find(|d| d["id"] == from)
                .and_then(|d| d["bytes_in"].as_u64())
        })
        .unwrap_or(0)
}

/// `names.len()` running nodes, every pair paired with explicit addresses, all sharing
/// folder `id` (at `<node dir>/<id>`), connected to each other. Returns the nodes and
/// their folder paths.
pub fn mesh(names: &[&str], id: &str) -> (Vec<Node>, Vec<PathBuf>) {
    let mut nodes: Vec<Node> = names.iter().map(|n| Node::new(n)).collect();
    let ids: Vec<String> = nodes.iter().map(|n| n.id()).collect();
    for i in 0..nodes.len() {
        for j in i + 1..nodes.len() {
            pair(&nodes[i], &nodes[j]);
        }
    }
    let paths: Vec<PathBuf> = nodes.iter().map(|n| n.path(id)).collect();
    for (i, n) in nodes.iter().enumerate() {
        n.ok(&["folder", "add", paths[i].to_str().unwrap(), "--id", id]);
        for (j, other) in ids.iter().enumerate() {
            if i != j {
                n.ok(&["folder", "share", id, other]);
            }
        }
    }
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_for("every pair connected", Duration::from_secs(30), || {
        nodes
            .iter()
            .enumerate()
            .all(|(i, n)| {
                ids.iter()
                    .enumerate()
                    .all(|(j, other)| i == j || n.device_connected(other))
            })
            .then_some(())
    });
    (nodes, paths)
}

/// Waits (bounded) until every folder in `roots` has the same tree and it stays so for
/// `settle`; returns that tree. On timeout, panics with the differences.
pub fn wait_identical(
    roots: &[PathBuf],
    timeout: Duration,
    settle: Duration,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let start = Instant::now();
    let mut same_since: Option<(Instant, std::collections::BTreeMap<String, Vec<u8>>)> = None;
    loop {
        let trees: Vec<_> = roots.iter().map(|r| tree(r)).collect();
        if trees.iter().all(|t| t == &trees[0]) {
            match &same_since {
                Some((t0, prev)) if prev == &trees[0] => {
                    if t0.elapsed() >= settle {
                        return trees.into_iter().next().unwrap();
                    }
                }
                _ => same_since = Some((Instant::now(), trees[0].clone())),
            }
        } else {
            same_since = None;
        }
        if start.elapsed() > timeout {
            panic!(
                "folders not identical after {timeout:?}:\n{}",
                tree_diff(roots, &trees)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The names on which the trees differ, and how (for failure messages).
pub fn tree_diff(
    roots: &[PathBuf],
    trees: &[std::collections::BTreeMap<String, Vec<u8>>],
) -> String {
    let mut names = std::collections::BTreeSet::new();
    for t in trees {
        names.extend(t.keys().cloned());
    }
    let mut out = String::new();
    for n in names {
        let vals: Vec<Option<&Vec<u8>>> = trees.iter().map(|t| t.get(&n)).collect();
        if vals.iter().all(|v| v == &vals[0]) {
            continue;
        }
        out.push_str(&format!("  {n}:"));
        for (r, v) in roots.iter().zip(&vals) {
            let what = match v {
                None => "missing".to_string(),
                Some(b) => format!("{} bytes {:.16}", b.len(), blake3::hash(b).to_hex()),
            };
            out.push_str(&format!(" [{}: {what}]", r.display()));
        }
        out.push('\n');
    }
    out
}

/// Writes `len` deterministic pseudo-random bytes to `path` a MiB at a time.
pub fn write_big(path: &Path, seed: u64, len: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut left = len;
    let mut i = 0u64;
    while left > 0 {
        let n = left.min(1 << 20);
        f.write_all(&data(seed.wrapping_mul(1_000_003).wrapping_add(i), n))
            .expect("write");
        left -= n;
        i += 1;
    }
    f.into_inner().expect("flush").sync_all().expect("fsync");
}

/// BLAKE3 of a file's content, streamed.
pub fn file_hash(path: &Path) -> Option<blake3::Hash> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(h.finalize())
}

/// Every `.ferry-tmp-*` file under `root` (outside `.ferry/`), relative names.
pub fn temp_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".ferry" {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            } else if e.file_name().to_string_lossy().starts_with(".ferry-tmp-") {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}
