//! Interruptions: a receiver killed with SIGKILL in the middle of a large file resumes
//! from the verified blocks in its temp file instead of downloading them again; temp
//! files that no pull will finish are cleaned up (or reused when their data is useful);
//! a folder loop restarted by a settings change keeps announcing its changes.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// Two paired nodes sharing folder "f", not started.
fn pair_stopped() -> (Node, Node, PathBuf, PathBuf) {
    let a = Node::new("a");
    let b = Node::new("b");
    pair(&a, &b);
    let (pa, pb) = (a.path("f"), b.path("f"));
    share(&a, &b, "f", &pa, &pb);
    (a, b, pa, pb)
}

fn start_both(a: &mut Node, b: &mut Node) {
    a.start();
    b.start();
    let (ida, idb) = (a.id(), b.id());
    wait_for("connected", T, || {
        (a.device_connected(&idb) && b.device_connected(&ida)).then_some(())
    });
}

fn size_of(p: &Path) -> Option<u64> {
    fs::symlink_metadata(p).ok().map(|m| m.len())
}

#[test]
fn a_receiver_killed_mid_transfer_resumes_without_downloading_verified_blocks_again() {
    const SIZE: usize = 256 << 20;
    let (mut a, mut b, pa, pb) = pair_stopped();
    start_both(&mut a, &mut b);
    let ida = a.id();

    // Written outside the folder and moved in, so A indexes it once, complete.
    let staging = a.path("staging").join("big.bin");
    write_big(&staging, 7, SIZE);
    let want = file_hash(&staging).unwrap();
    fs::rename(&staging, pa.join("big.bin")).unwrap();

    // Kill B once its temp file holds a good part of the file.
    let temp = pb.join(".ferry-tmp-big.bin");
    let at_kill = wait_for(
        "B's temp file to pass 40%",
        Duration::from_secs(120),
        || {
            assert!(
                !pb.join("big.bin").exists(),
                "the transfer finished before B could be killed; make the file larger"
            );
            size_of(&temp).filter(|&n| n >= (SIZE as u64) * 2 / 5)
        },
    );
    b.kill();
    let left = size_of(&temp).expect("the temp file survives SIGKILL");
    assert!(left >= at_kill);
    assert!(!pb.join("big.bin").exists());

    b.start();
    let started = Instant::now();
    wait_for("big.bin complete on B", Duration::from_secs(180), || {
        (size_of(&pb.join("big.bin")) == Some(SIZE as u64)).then_some(())
    });
    let took = started.elapsed();
    assert_eq!(file_hash(&pb.join("big.bin")).unwrap(), want, "content");
    assert!(!temp.exists(), "the temp file was renamed into place");

    // bytes_in counts from B's restart: it must not include what the temp file held,
    // but for the holes the blocks in flight at the kill left (at most 16 blocks of at
    // most 1 MiB) and the protocol's own bytes (a few percent).
    let after = bytes_in_from(&b, &ida);
    let budget = (SIZE as u64 - left) + (16 << 20) + SIZE as u64 / 25;
    eprintln!(
        "resume: killed at a {at_kill}-byte temp file ({left} after the kill); after the \
         restart B received {after} bytes in {took:?}"
    );
    assert!(
        after < budget,
        "after the restart B received {after} bytes for a {SIZE}-byte file whose temp \
         file already held {left} bytes (budget {budget}); took {took:?}"
    );
    assert!(
        b.log().contains("resuming from verified blocks"),
        "B's log does not mention resuming"
    );
}

/// Sets a file's mtime to `days` days ago.
fn age(p: &Path, days: u64) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(days * 24 * 3600))
        .unwrap();
}

#[test]
fn stale_temp_files_are_cleaned_up_or_reused() {
    let (mut a, mut b, pa, pb) = pair_stopped();
    // On B, before it ever runs: a week-old leftover in a subdirectory, and a fresh
    // temp file of garbage under the name A's file will be pulled to.
    fs::create_dir_all(pb.join("sub")).unwrap();
    fs::write(pb.join("sub/.ferry-tmp-ancient.txt"), b"left over").unwrap();
    age(&pb.join("sub/.ferry-tmp-ancient.txt"), 8);
    fs::write(pb.join(".ferry-tmp-small.bin"), data(99, 150_000)).unwrap();
    // A's file: several chunks, part of them equal to a prefix of the garbage length.
    fs::write(pa.join("small.bin"), data(1, 300_000)).unwrap();
    fs::write(pa.join("gone.bin"), data(2, 100_000)).unwrap();
    start_both(&mut a, &mut b);

    wait_for("small.bin on B", T, || {
        (fs::read(pb.join("small.bin")).ok()? == data(1, 300_000)).then_some(())
    });
    wait_for("gone.bin on B", T, || {
        (fs::read(pb.join("gone.bin")).ok()? == data(2, 100_000)).then_some(())
    });
    assert!(
        !pb.join("sub/.ferry-tmp-ancient.txt").exists(),
        "a week-old temp file is removed at start-up"
    );
    assert_eq!(temp_files(&pb), Vec::<String>::new());

    // A pull interrupted for good: B holds a temp file for gone.bin (as if a newer
    // version had been half pulled), then A deletes the file. Once B applies the
    // deletion nothing will ever finish that temp file; it must not stay behind.
    b.stop();
    fs::write(pb.join(".ferry-tmp-gone.bin"), data(3, 50_000)).unwrap();
    fs::remove_file(pa.join("gone.bin")).unwrap();
    wait_for("A indexed the deletion", T, || {
        a.folder_status("f")
            .filter(|f| f["local_files"] == 1)
            .map(|_| ())
    });
    b.start();
    wait_for("gone.bin deleted on B", T, || {
        (!pb.join("gone.bin").exists()).then_some(())
    });
    wait_for("no temp files left on B", T, || {
        temp_files(&pb).is_empty().then_some(())
    });
    assert_eq!(tree(&pa), tree(&pb));
}

/// Regression: changing a folder's settings restarts its loop, and the index sender to
/// each peer waited on the old loop's sequence watch — it ended there, and the peer heard
/// of no further change until it reconnected.
#[test]
fn changes_keep_flowing_after_a_folder_settings_change_restarts_its_loop() {
    let (mut a, mut b, pa, pb) = pair_stopped();
    start_both(&mut a, &mut b);
    fs::write(pa.join("before.txt"), b"before").unwrap();
    wait_for("before.txt on B", T, || {
        fs::read(pb.join("before.txt")).ok()
    });
    a.ok(&["folder", "set", "f", "--versioning", "trashcan"]);
    // Let the restarted loop come up (its start-up scan), then change something.
    std::thread::sleep(Duration::from_millis(500));
    fs::write(pa.join("after.txt"), b"after").unwrap();
    wait_for("after.txt on B", T, || fs::read(pb.join("after.txt")).ok());
    // And the other way round, into the restarted folder.
    fs::write(pb.join("back.txt"), b"back").unwrap();
    wait_for("back.txt on A", T, || fs::read(pa.join("back.txt")).ok());
}
