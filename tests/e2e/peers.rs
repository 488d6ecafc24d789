//! Devices finding and trusting each other: pairing, pending, invites, reconnects, API key.

use std::io::{Read, Write};
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn paired_devices_connect_unknown_ones_wait() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    let mut c = Node::new("c");
    pair(&a, &b);
    // C knows A, A does not know C.
    c.ok(&["device", "add", &a.id(), "--addr", &a.addr()]);
    let docs = a.path("docs");
    std::fs::write(docs.join("secret.txt"), b"for b only").unwrap();
    a.ok(&["folder", "add", docs.to_str().unwrap(), "--id", "docs"]);
    a.ok(&["folder", "share", "docs", &b.id()]);
    a.start();
    b.start();
    c.start();
    wait_for("A sees B", T, || a.device_connected(&b.id()).then_some(()));
    wait_for("B sees A", T, || b.device_connected(&a.id()).then_some(()));

    // C is pending on A, and gets nothing.
    wait_for("C pending on A", T, || {
        a.ok(&["device", "pending", "--json"])
            .contains(&c.id())
            .then_some(())
    });
    assert!(!a.device_connected(&c.id()));
    assert!(!c.device_connected(&a.id()));

    // The folder A shares is pending on B.
    let pending = wait_for("docs pending on B", T, || {
        let p: serde_json::Value =
            serde_json::from_str(&b.ok(&["folder", "pending", "--json"])).ok()?;
        p.as_array()?.iter().any(|f| f["id"] == "docs").then_some(p)
    });
    assert_eq!(pending[0]["device"], a.id());

    // After A accepts C, they connect.
    a.ok(&["device", "accept", &c.id()]);
    wait_for("A and C connected", T, || {
        (a.device_connected(&c.id()) && c.device_connected(&a.id())).then_some(())
    });

    // B accepts the folder and gets the file.
    let dest = b.path("docs-from-a");
    b.ok(&["folder", "accept", "docs", dest.to_str().unwrap()]);
    wait_for("the file on B", T, || {
        (std::fs::read(dest.join("secret.txt")).ok()? == b"for b only").then_some(())
    });
    assert!(!c.dir.path().join("docs").exists());

    // Bytes on the wire are counted.
    let st = b.status();
    let d = st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == a.id())
        .unwrap()
        .clone();
    assert!(d["bytes_in"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(d["connection_type"], "tcp");
}

#[test]
fn a_restarted_peer_reconnects_by_itself() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    pair(&a, &b);
    a.start();
    b.start();
    wait_for("connected", T, || a.device_connected(&b.id()).then_some(()));
    b.kill();
    wait_for("A notices", T, || {
        (!a.device_connected(&b.id())).then_some(())
    });
    b.start();
    wait_for("reconnected", T, || {
        (a.device_connected(&b.id()) && b.device_connected(&a.id())).then_some(())
    });
}

fn http(port: u16, req: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_api_wants_its_key() {
    let mut a = Node::new("a");
    a.start();
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.home.join("daemon.json")).unwrap())
            .unwrap();
    let port: u16 = info["api"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let before = std::fs::read_to_string(a.home.join("config.toml")).unwrap();
    let r = http(
        port,
        "POST /rest/pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert!(r.contains("\"error\""), "{r}");
    assert_eq!(
        std::fs::read_to_string(a.home.join("config.toml")).unwrap(),
        before
    );
    let cfg = std::fs::read_to_string(a.home.join("config.toml")).unwrap();
    let key = cfg
        .lines()
        .find(|l| l.starts_with("key"))
        .and_then(|l| l.split('"').nth(1))
        .unwrap()
        .to_string();
    let body = "{not json";
    let r = http(
        port,
        &format!("POST /rest/devices HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    );
    assert!(r.starts_with("HTTP/1.1 4"), "{r}");
    assert!(r.contains("\"error\""), "{r}");
    let r = http(
        port,
        &format!(
            "GET /rest/status HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[test]
fn invite_pairs_in_one_step_and_only_once() {
    let mut a = Node::new("a");
    let mut b = Node::new("b");
    let mut c = Node::new("c");
    let docs = a.path("docs");
    std::fs::write(docs.join("hello.txt"), b"hi from a").unwrap();
    a.ok(&["folder", "add", docs.to_str().unwrap(), "--id", "docs"]);
    a.start();
    b.start();
    let invite = a.ok(&["invite", "--folder", "docs"]).trim().to_string();
    assert!(invite.starts_with("FERRY1-"), "{invite}");
    let dest = b.path("joined");
    let out = b.ok(&["join", &invite, "--path", dest.to_str().unwrap()]);
    assert!(out.contains("Paired"), "{out}");
    wait_for("paired both ways", T, || {
        (a.device_connected(&b.id()) && b.device_connected(&a.id())).then_some(())
    });
    wait_for("the folder content on B", T, || {
        (std::fs::read(dest.join("hello.txt")).ok()? == b"hi from a").then_some(())
    });
    // The same invite again (from another device) is refused.
    c.start();
    let out = c.cmd(&["join", &invite]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already used"), "{err}");
    assert!(!a.ok(&["device", "list"]).contains(&c.id()));
    // An altered invite is refused before any connection.
    let mut altered: Vec<char> = invite.chars().collect();
    let i = altered.len() / 2;
    altered[i] = if altered[i] == 'A' { 'B' } else { 'A' };
    let altered: String = altered.into_iter().collect();
    let out = c.cmd(&["join", &altered]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
}
