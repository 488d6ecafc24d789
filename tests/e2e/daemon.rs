//! One daemon on its own: indexing, the watcher, status and a clean stop.

use std::time::Duration;

use crate::common::*;

#[test]
fn daemon_indexes_a_folder_and_follows_changes() {
    let mut n = Node::new("a");
    let docs = n.path("docs");
    let mut total = 0u64;
    for i in 0..50 {
        let d = docs.join(format!("d{}", i % 5));
        std::fs::create_dir_all(&d).unwrap();
        let body = data(i, 1000 + i as usize * 37);
        total += body.len() as u64;
        std::fs::write(d.join(format!("f{i}.bin")), body).unwrap();
    }
    n.ok(&["folder", "add", docs.to_str().unwrap(), "--id", "docs"]);
    n.start();
    let f = wait_for("50 files indexed", Duration::from_secs(20), || {
        n.folder_status("docs")
            .filter(|f| f["local_files"] == 50 && f["state"] == "idle")
    });
    assert_eq!(f["local_bytes"], total);
    assert_eq!(f["global_bytes"], total);
    assert_eq!(f["need_files"], 0);
    assert_eq!(f["completion"], 100.0);
    let st = n.status();
    assert_eq!(st["device_id"], n.id());
    assert!(st["listen"][0].as_str().unwrap().contains("127.0.0.1"));

    // A new file shows up through the watcher, without a scan command.
    std::fs::write(docs.join("new.txt"), b"hello").unwrap();
    wait_for("the new file in status", Duration::from_secs(5), || {
        n.folder_status("docs").filter(|f| f["local_files"] == 51)
    });
    // A deletion too.
    std::fs::remove_file(docs.join("new.txt")).unwrap();
    wait_for("the deletion in status", Duration::from_secs(5), || {
        n.folder_status("docs").filter(|f| f["local_files"] == 50)
    });

    // A folder added while the daemon runs is picked up without restart.
    let more = n.path("more");
    std::fs::write(more.join("x"), b"xyz").unwrap();
    n.ok(&["folder", "add", more.to_str().unwrap(), "--id", "more"]);
    wait_for("the second folder indexed", Duration::from_secs(10), || {
        n.folder_status("more").filter(|f| f["local_files"] == 1)
    });
    n.ok(&["scan", "more"]);

    // Every thread of the engine (runtime, blocking pool, index, watcher) runs as a
    // batch thread, which never preempts another when it wakes.
    #[cfg(target_os = "linux")]
    {
        let pid = n.child.as_ref().expect("running").id();
        let threads = thread_policies(pid);
        assert!(threads.len() > 3, "{threads:?}");
        let not_batch: Vec<_> = threads
            .iter()
            .filter(|(_, policy)| *policy != libc::SCHED_BATCH)
            .collect();
        assert!(not_batch.is_empty(), "not SCHED_BATCH: {not_batch:?}");
    }

    assert_eq!(n.stop(), Some(0), "SIGTERM exits 0");
    assert!(!n.home.join("daemon.json").exists());
}

#[test]
fn status_without_a_daemon_says_so() {
    let n = Node::new("a");
    let out = n.cmd(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

#[test]
fn offline_scan_indexes_and_a_missing_marker_stops_it() {
    let n = Node::new("a");
    let docs = n.path("docs");
    std::fs::write(docs.join("a"), b"1").unwrap();
    n.ok(&["folder", "add", docs.to_str().unwrap(), "--id", "docs"]);
    let out = n.ok(&["scan"]);
    assert!(out.contains("1 files"), "{out}");
    std::fs::remove_dir(docs.join(".ferry")).unwrap();
    let out = n.cmd(&["scan"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("marker"));
}

/// Name and scheduling policy of each thread of `pid`, from `/proc`.
#[cfg(target_os = "linux")]
fn thread_policies(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        // Fields after the name start with the 3rd (state); the policy is the 41st.
        let policy = stat[close + 1..].split_whitespace().nth(41 - 3);
        if let Some(p) = policy.and_then(|p| p.parse().ok()) {
            out.push((stat[open + 1..close].to_string(), p));
        }
    }
    out
}
