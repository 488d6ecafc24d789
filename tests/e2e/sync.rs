//! Folders converge: what is made, changed or removed on one device arrives on the other,
//! and nothing is lost when edits collide.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// Two running, paired nodes sharing folder "f".
fn pair_running() -> (Node, Node, PathBuf, PathBuf) {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    let (pa, pb) = (a.path("f"), b.path("f"));
    share(&a, &b, "f", &pa, &pb);
    a.start();
    b.start();
    wait_for("connected", T, || {
        (a.device_connected(&b.id()) && b.device_connected(&a.id())).then_some(())
    });
    (a, b, pa, pb)
}

fn converged(pa: &Path, pb: &Path) -> Option<()> {
    (tree(pa) == tree(pb)).then_some(())
}

/// `n`'s status says it asks `other` for large blocks on a block lane.
fn block_lane(n: &Node, other: &Node) -> bool {
    let st = n.status();
    st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["id"] == other.id() && d["block_lane"] == true)
}

fn bytes_in(n: &Node, from: &Node) -> u64 {
    let st = n.status();
    st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == from.id())
        .map(|d| d["bytes_in"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

#[test]
fn create_modify_delete_rename_and_odd_names() {
    let (a, b, pa, pb) = pair_running();
    // Create: nested, unicode, spaces, empty file, empty dir, symlink.
    fs::create_dir_all(pa.join("dir/sub")).unwrap();
    fs::create_dir_all(pa.join("empty dir")).unwrap();
    fs::write(pa.join("dir/sub/a.txt"), b"alpha").unwrap();
    fs::write(pa.join("Grüße – ünïcödé.txt"), b"unicode").unwrap();
    fs::write(pa.join("with spaces.md"), b"spaces").unwrap();
    fs::write(pa.join("zero"), b"").unwrap();
    std::os::unix::fs::symlink("dir/sub/a.txt", pa.join("link")).unwrap();
    wait_for("create converges", T, || converged(&pa, &pb));
    assert_eq!(
        fs::read(pb.join("Grüße – ünïcödé.txt")).unwrap(),
        b"unicode"
    );
    assert!(pb.join("empty dir").is_dir());
    assert_eq!(
        fs::read_link(pb.join("link")).unwrap(),
        PathBuf::from("dir/sub/a.txt")
    );

    // Modify on B, arrives on A.
    fs::write(pb.join("dir/sub/a.txt"), b"alpha, edited on b").unwrap();
    wait_for("modify converges", T, || {
        (fs::read(pa.join("dir/sub/a.txt")).ok()? == b"alpha, edited on b").then_some(())
    });

    // Mode change.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(pa.join("with spaces.md"), fs::Permissions::from_mode(0o600)).unwrap();
    wait_for("mode converges", T, || {
        (fs::metadata(pb.join("with spaces.md"))
            .ok()?
            .permissions()
            .mode()
            & 0o777
            == 0o600)
            .then_some(())
    });

    // Delete a file and a directory.
    fs::remove_file(pa.join("zero")).unwrap();
    fs::remove_dir(pa.join("empty dir")).unwrap();
    wait_for("delete converges", T, || converged(&pa, &pb));
    assert!(!pb.join("zero").exists());
    assert!(!pb.join("empty dir").exists());

    // Rename of a 5 MB file moves (almost) nothing over the wire.
    fs::write(pa.join("big.bin"), data(5, 5_000_000)).unwrap();
    wait_for("big file arrives", T, || converged(&pa, &pb));
    let before = bytes_in(&b, &a);
    fs::rename(pa.join("big.bin"), pa.join("dir/renamed.bin")).unwrap();
    wait_for("rename converges", T, || converged(&pa, &pb));
    let moved = bytes_in(&b, &a) - before;
    assert!(moved < 1_000_000, "a 5 MB rename moved {moved} bytes");
}

#[test]
fn large_file_arrives_intact() {
    let (a, b, pa, pb) = pair_running();
    // Both daemons run with block lanes (the default): each asks the other on one.
    wait_for("block lanes both ways", T, || {
        (block_lane(&a, &b) && block_lane(&b, &a)).then_some(())
    });
    fs::write(pa.join("fifty.bin"), data(50, 50 * 1024 * 1024)).unwrap();
    wait_for("50 MB file", Duration::from_secs(90), || {
        converged(&pa, &pb)
    });
    assert!(bytes_in(&b, &a) >= 50 * 1024 * 1024);
}

/// One device with `block_lanes = false` (as an older Ferry has none): large files still
/// go both ways, through libp2p alone.
#[test]
fn large_files_go_both_ways_when_one_side_has_block_lanes_off() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    let (pa, pb) = (a.path("f"), b.path("f"));
    share(&a, &b, "f", &pa, &pb);
    let config = b.home.join("config.toml");
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("block_lanes = true"), "{text}");
    fs::write(
        &config,
        text.replace("block_lanes = true", "block_lanes = false"),
    )
    .unwrap();
    a.start();
    b.start();
    fs::write(pa.join("to-b.bin"), data(51, 12 * 1024 * 1024)).unwrap();
    fs::write(pb.join("to-a.bin"), data(52, 12 * 1024 * 1024)).unwrap();
    wait_for("both files on both sides", Duration::from_secs(90), || {
        (tree(&pa).len() == 2).then_some(())?;
        converged(&pa, &pb)
    });
    assert!(!block_lane(&a, &b) && !block_lane(&b, &a));
}

#[test]
fn concurrent_edits_while_one_side_is_down_keep_both() {
    let (a, mut b, pa, pb) = pair_running();
    fs::write(pa.join("note.txt"), b"v1").unwrap();
    wait_for("v1 on b", T, || converged(&pa, &pb));
    b.stop();
    fs::write(pa.join("note.txt"), b"edited on a").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(pb.join("note.txt"), b"edited on b, later").unwrap();
    // Let A index its edit before B comes back.
    wait_for("a indexed", T, || {
        a.folder_status("f")
            .filter(|f| f["state"] == "idle")
            .map(|_| ())
    });
    b.start();
    wait_for(
        "converged with a conflict copy",
        Duration::from_secs(40),
        || {
            let t = tree(&pa);
            (t == tree(&pb) && t.len() == 2).then_some(())
        },
    );
    let t = tree(&pa);
    let contents: Vec<&Vec<u8>> = t.values().collect();
    assert!(
        contents.iter().any(|c| c.as_slice() == b"edited on a"),
        "{t:?}"
    );
    assert!(
        contents
            .iter()
            .any(|c| c.as_slice() == b"edited on b, later"),
        "{t:?}"
    );
    // The later edit wins the name; the other is the conflict copy.
    assert_eq!(
        fs::read(pa.join("note.txt")).unwrap(),
        b"edited on b, later"
    );
    assert!(
        t.keys()
            .any(|k| k.starts_with("note.sync-conflict-") && k.ends_with(".txt")),
        "{t:?}"
    );
}

#[test]
fn send_only_and_receive_only() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    let (pa, pb) = (a.path("f"), b.path("f"));
    share_as(&a, &b, "f", (&pa, "send-only"), (&pb, "receive-only"));
    a.start();
    b.start();
    fs::write(pa.join("from-a"), b"a").unwrap();
    wait_for("a's file on b", T, || fs::read(pb.join("from-a")).ok());
    // B's local edits stay on B; A's remote edits are not applied on A.
    fs::write(pb.join("from-b"), b"b").unwrap();
    fs::write(pb.join("from-a"), b"changed on b").unwrap();
    // Wait until B has indexed its changes, then give A time to (not) react.
    wait_for("b indexed", T, || {
        b.folder_status("f")
            .filter(|f| f["local_files"] == 2)
            .map(|_| ())
    });
    fs::write(pa.join("marker"), b"m").unwrap();
    wait_for("marker on b", T, || fs::read(pb.join("marker")).ok());
    assert!(
        !pa.join("from-b").exists(),
        "receive-only must not send local files"
    );
    assert_eq!(fs::read(pa.join("from-a")).unwrap(), b"a");

    // B's edits are flagged, and reverting them restores A's state.
    let f = b.folder_status("f").unwrap();
    assert_eq!(f["local_changes"], 2, "{f}");
    let out = b.ok(&["folder", "revert", "f"]);
    assert!(out.contains("Reverted 2"), "{out}");
    wait_for("b back to a's content", T, || {
        (fs::read(pb.join("from-a")).ok()? == b"a" && !pb.join("from-b").exists()).then_some(())
    });
    wait_for("no local changes left", T, || {
        b.folder_status("f")
            .filter(|f| f["local_changes"] == 0)
            .map(|_| ())
    });
    assert!(!tree(&pb).keys().any(|k| k.contains("sync-conflict")));
}

#[test]
fn a_chain_relays_changes() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    let mut c = Node::new("c");
    pair(&a, &b);
    pair(&b, &c);
    let (pa, pb, pc) = (a.path("f"), b.path("f"), c.path("f"));
    share(&a, &b, "f", &pa, &pb);
    c.ok(&["folder", "add", pc.to_str().unwrap(), "--id", "f"]);
    c.ok(&["folder", "share", "f", &b.id()]);
    b.ok(&["folder", "share", "f", &c.id()]);
    a.start();
    b.start();
    c.start();
    fs::write(pa.join("hop.txt"), b"from a via b").unwrap();
    wait_for("a's file on c", T, || {
        (fs::read(pc.join("hop.txt")).ok()? == b"from a via b").then_some(())
    });
    fs::write(pc.join("back.txt"), b"from c").unwrap();
    wait_for("c's file on a", T, || {
        (fs::read(pa.join("back.txt")).ok()? == b"from c").then_some(())
    });
}

#[test]
fn a_missing_marker_stops_the_folder_instead_of_deleting() {
    let (a, b, pa, pb) = pair_running();
    fs::write(pa.join("keep.txt"), b"keep").unwrap();
    wait_for("synced", T, || converged(&pa, &pb));
    // "Unmount" A's folder: the marker and the files vanish.
    fs::remove_dir_all(&pa).unwrap();
    fs::create_dir_all(&pa).unwrap();
    let _ = a.cmd(&["scan", "f"]); // fails: the folder is in error
    wait_for("error state on a", T, || {
        a.folder_status("f")
            .filter(|f| f["state"] == "error")
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        fs::read(pb.join("keep.txt")).unwrap(),
        b"keep",
        "no deletion propagated"
    );
    let _ = b;
}

#[test]
fn versioning_keeps_replaced_and_deleted_files_and_ignore_delete_keeps_files() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    let (pa, pb) = (a.path("f"), b.path("f"));
    share(&a, &b, "f", &pa, &pb);
    b.ok(&[
        "folder",
        "set",
        "f",
        "--versioning",
        "trashcan",
        "--keep-days",
        "3",
    ]);
    a.start();
    b.start();
    fs::write(pa.join("doc.txt"), b"first").unwrap();
    fs::write(pa.join("gone.txt"), b"to be deleted").unwrap();
    wait_for("synced", T, || converged(&pa, &pb));
    fs::write(pa.join("doc.txt"), b"second").unwrap();
    fs::remove_file(pa.join("gone.txt")).unwrap();
    wait_for("changes applied on b", T, || converged(&pa, &pb));
    let versions: Vec<Vec<u8>> = tree(&pb.join(".ferry/versions")).into_values().collect();
    assert!(
        versions.iter().any(|v| v == b"first"),
        "replaced content kept"
    );
    assert!(
        versions.iter().any(|v| v == b"to be deleted"),
        "deleted content kept"
    );

    // With ignore-delete, B keeps files A deletes (B's status says it has them).
    b.ok(&["folder", "set", "f", "--ignore-delete", "true"]);
    fs::write(pa.join("keep-on-b.txt"), b"k").unwrap();
    wait_for("arrives", T, || fs::read(pb.join("keep-on-b.txt")).ok());
    fs::remove_file(pa.join("keep-on-b.txt")).unwrap();
    fs::write(pa.join("after.txt"), b"after").unwrap();
    wait_for("later file arrives", T, || {
        fs::read(pb.join("after.txt")).ok()
    });
    assert!(pb.join("keep-on-b.txt").exists());
    // The ignored deletion is not "needed": B settles up to date, not stuck below 100%.
    wait_for("b up to date despite the ignored deletion", T, || {
        b.folder_status("f")
            .filter(|f| f["need_files"] == 0 && f["completion"] == 100.0 && f["state"] == "idle")
    });
    assert!(pb.join("keep-on-b.txt").exists());

    // Deletions honoured again: the deletion B ignored now applies.
    b.ok(&["folder", "set", "f", "--ignore-delete", "false"]);
    wait_for(
        "ignored deletion applied once deletes count again",
        T,
        || (!pb.join("keep-on-b.txt").exists()).then_some(()),
    );
    wait_for("in sync", T, || converged(&pa, &pb));
}

/// Regression: a device pulled names that its own `.ferryignore` excludes (only the
/// scanner read the rules). Now it neither pulls nor deletes them, still settles up to
/// date, and pulls them once the rules let them in again.
#[test]
fn names_ignored_on_the_receiving_side_are_not_pulled_nor_deleted() {
    let (a, b, pa, pb) = pair_running();
    fs::write(pa.join("keep.log"), b"synced before the rules").unwrap();
    wait_for("keep.log arrives", T, || fs::read(pb.join("keep.log")).ok());

    // B's rules ignore themselves, so they stay on B.
    fs::write(pb.join(".ferryignore"), "*.log\ncache/\n.ferryignore\n").unwrap();
    b.ok(&["scan", "f"]);
    fs::create_dir_all(pa.join("cache")).unwrap();
    fs::write(pa.join("cache/x.bin"), b"cached").unwrap();
    fs::write(pa.join("new.log"), b"log").unwrap();
    fs::remove_file(pa.join("keep.log")).unwrap();
    // Recorded on A before doc.txt, so sent before it: once doc.txt is on B, B has seen
    // every change above.
    a.ok(&["scan", "f"]);
    fs::write(pa.join("doc.txt"), b"doc").unwrap();
    wait_for("doc.txt arrives", T, || fs::read(pb.join("doc.txt")).ok());
    wait_for("b up to date without the ignored names", T, || {
        b.folder_status("f")
            .filter(|f| f["need_files"] == 0 && f["completion"] == 100.0 && f["state"] == "idle")
    });
    assert!(
        !pb.join("new.log").exists(),
        "an ignored new file was pulled"
    );
    assert!(
        !pb.join("cache").exists(),
        "an ignored directory was pulled"
    );
    assert_eq!(
        fs::read(pb.join("keep.log")).unwrap(),
        b"synced before the rules",
        "the deletion of an ignored file was applied"
    );
    assert!(!pa.join(".ferryignore").exists());

    // Without the rules, everything applies: the new names arrive, the deletion too.
    fs::remove_file(pb.join(".ferryignore")).unwrap();
    wait_for("in sync once nothing is ignored", T, || converged(&pa, &pb));
    assert!(!pb.join("keep.log").exists());
    let _ = a;
}

/// Regression: two devices that already hold the same files (copied by hand before
/// pairing) made a conflict copy of every one of them.
#[test]
fn identical_files_on_both_sides_are_not_conflicts() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    let (pa, pb) = (a.path("f"), b.path("f"));
    for i in 0..20u64 {
        let body = data(i, 3000 + i as usize);
        fs::create_dir_all(pa.join("d")).unwrap();
        fs::create_dir_all(pb.join("d")).unwrap();
        fs::write(pa.join(format!("d/{i}.bin")), &body).unwrap();
        fs::write(pb.join(format!("d/{i}.bin")), &body).unwrap();
    }
    share(&a, &b, "f", &pa, &pb);
    a.start();
    b.start();
    wait_for("both idle and in sync", T, || {
        let fa = a.folder_status("f")?;
        let fb = b.folder_status("f")?;
        (fa["need_files"] == 0
            && fb["need_files"] == 0
            && fa["global_files"] == 20
            && fb["global_files"] == 20
            && fa["devices"][0]["completion"] == 100.0)
            .then_some(())
    });
    let t = tree(&pa);
    assert!(
        !t.keys().any(|k| k.contains("sync-conflict")),
        "{:?}",
        t.keys()
    );
    assert_eq!(t, tree(&pb));
}

/// Regression: a folder accepted into a directory that already holds files sent the
/// offerer's files over, but its own files stayed put until the next reconnect.
#[test]
fn accepting_a_folder_sends_what_the_accepting_side_has() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    let pa = a.path("f");
    fs::write(pa.join("from-a.txt"), b"a").unwrap();
    a.ok(&["folder", "add", pa.to_str().unwrap(), "--id", "f"]);
    a.ok(&["folder", "share", "f", &b.id()]);
    a.start();
    b.start();
    wait_for("offer on b", T, || {
        b.ok(&["folder", "pending", "--json"])
            .contains("\"f\"")
            .then_some(())
    });
    let pb = b.path("f");
    fs::write(pb.join("from-b.txt"), b"b").unwrap();
    b.ok(&["folder", "accept", "f", pb.to_str().unwrap()]);
    wait_for("both files on both sides", T, || {
        (fs::read(pa.join("from-b.txt")).ok()? == b"b"
            && fs::read(pb.join("from-a.txt")).ok()? == b"a")
            .then_some(())
    });
}

/// More small files than one pull page (1,024 names): the pages are installed behind one
/// another, and every installed file is recorded. On a receive-only device a file on disk
/// that the index did not record would show as a local change after a restart's rescan.
#[test]
fn thousands_of_small_files_arrive_and_are_all_recorded() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    let (pa, pb) = (a.path("f"), b.path("f"));
    share_as(&a, &b, "f", (&pa, "send-receive"), (&pb, "receive-only"));
    a.start();
    b.start();
    const FILES: usize = 2_600;
    for i in 0..FILES {
        let dir = pa.join(format!("d{:02}", i % 26));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(format!("{i}.txt")),
            format!("file {i}\n").repeat(i % 7 + 1),
        )
        .unwrap();
    }
    wait_for("all files on b", Duration::from_secs(90), || {
        converged(&pa, &pb)
    });
    wait_for("b needs nothing", T, || {
        b.folder_status("f")
            .filter(|f| f["need_files"] == 0 && f["local_files"].as_u64() >= Some(FILES as u64))
            .map(|_| ())
    });
    assert!(temp_files(&pb).is_empty(), "{:?}", temp_files(&pb));

    b.stop();
    b.start();
    wait_for("b rescanned", T, || {
        b.folder_status("f")
            .filter(|f| f["state"] == "idle" && f["local_files"].as_u64() >= Some(FILES as u64))
    });
    let f = b.folder_status("f").unwrap();
    assert_eq!(f["local_changes"], 0, "{f}");
    assert_eq!(f["need_files"], 0, "{f}");
    assert!(converged(&pa, &pb).is_some());
}

/// A directory deleted on A that holds a file B ignores (and so never announced): B
/// keeps the directory and the ignored file, says why, and lets the deletion through once
/// that file is gone. Before, B rescanned the directory for ever with "changed on disk".
#[test]
fn a_deleted_directory_that_holds_ignored_files_is_kept_with_a_reason() {
    let (a, b, pa, pb) = pair_running();
    fs::write(pb.join(".ferryignore"), "*.log\n.ferryignore\n").unwrap();
    b.ok(&["scan", "f"]);
    fs::create_dir_all(pa.join("d/sub")).unwrap();
    fs::write(pa.join("d/x.txt"), b"x").unwrap();
    fs::write(pa.join("d/sub/y.txt"), b"y").unwrap();
    wait_for("d arrives", T, || fs::read(pb.join("d/sub/y.txt")).ok());
    fs::write(pb.join("d/sub/local.log"), b"only on b, ignored there").unwrap();
    fs::remove_dir_all(pa.join("d")).unwrap();
    let why = wait_for("b explains the kept directory", T, || {
        let f = b.folder_status("f")?;
        let errors = f["pull_errors"].as_array()?.clone();
        errors
            .iter()
            .find(|e| {
                e["name"] == "d/sub"
                    && e["error"]
                        .as_str()
                        .is_some_and(|s| s.contains(".ferryignore"))
            })
            .map(|e| e["error"].as_str().unwrap().to_string())
    });
    assert!(why.contains("d/sub/local.log"), "{why}");
    assert_eq!(
        fs::read(pb.join("d/sub/local.log")).unwrap(),
        b"only on b, ignored there"
    );
    assert!(!pb.join("d/x.txt").exists() && !pb.join("d/sub/y.txt").exists());
    // Nothing came back to A: the kept directory is B's own business.
    assert!(!pa.join("d").exists());

    fs::remove_file(pb.join("d/sub/local.log")).unwrap();
    wait_for("the deletion goes through", T, || {
        (!pb.join("d").exists()).then_some(())
    });
    wait_for("b up to date", T, || {
        b.folder_status("f")
            .filter(|f| f["need_files"] == 0 && f["completion"] == 100.0 && f["state"] == "idle")
    });
    let _ = a;
}
