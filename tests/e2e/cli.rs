//! Commands without a daemon: identity, device IDs, config edits and their errors.

use crate::common::*;

#[test]
fn init_makes_identity_and_keeps_it() {
    let n = Node::new("a");
    let id1 = n.id();
    assert!(n.home.join("config.toml").is_file());
    let key = n.home.join("identity.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = n.ok(&["init"]);
    assert!(out.contains(&id1), "{out}");
    assert_eq!(n.id(), id1, "init on an existing home keeps the identity");
}

#[test]
fn device_id_has_the_canonical_form() {
    let n = Node::new("a");
    let id = n.id();
    let groups: Vec<&str> = id.split('-').collect();
    assert_eq!(groups.len(), 8, "{id}");
    for g in groups {
        assert_eq!(g.len(), 7);
        assert!(
            g.chars()
                .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)),
            "{id}"
        );
    }
}

#[test]
fn mistyped_device_id_is_refused_and_nothing_is_stored() {
    let a = Node::new("a");
    let b = Node::new("b");
    let good = b.id();
    let before = std::fs::read_to_string(a.home.join("config.toml")).unwrap();
    // Change one character (keep it in the alphabet).
    let mut chars: Vec<char> = good.chars().collect();
    chars[3] = if chars[3] == 'A' { 'B' } else { 'A' };
    let typo: String = chars.into_iter().collect();
    let out = a.cmd(&["device", "add", &typo]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong") || err.contains("mistyped"), "{err}");
    assert_eq!(
        std::fs::read_to_string(a.home.join("config.toml")).unwrap(),
        before
    );
    // Lower case without dashes is fine.
    a.ok(&["device", "add", &good.to_lowercase().replace('-', "")]);
    let list = a.ok(&["device", "list", "--json"]);
    assert!(list.contains(&good), "{list}");
}

#[test]
fn folder_add_checks_the_path() {
    let n = Node::new("a");
    let missing = n.dir.path().join("does-not-exist");
    let out = n.cmd(&["folder", "add", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let p = n.path("docs");
    n.ok(&[
        "folder",
        "add",
        p.to_str().unwrap(),
        "--id",
        "docs",
        "--label",
        "Docs",
    ]);
    assert!(p.join(".ferry").is_dir(), "marker created");
    let inner = n.path("docs/inner");
    let out = n.cmd(&["folder", "add", inner.to_str().unwrap()]);
    assert!(!out.status.success(), "a folder inside another is refused");
    let list: serde_json::Value =
        serde_json::from_str(&n.ok(&["folder", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], "docs");
    assert_eq!(list[0]["label"], "Docs");
}

#[test]
fn malformed_config_is_reported_and_left_alone() {
    let n = Node::new("a");
    let path = n.home.join("config.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text = text.replace("mdns = false", "mdns = \"perhaps\"");
    std::fs::write(&path, &text).unwrap();
    let out = n.cmd(&["folder", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.toml:"),
        "names the file and line: {err}"
    );
    assert!(err.contains("mdns"), "names the key: {err}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "file untouched"
    );
}

#[test]
#[cfg(not(feature = "tray"))]
fn tray_without_the_feature_says_how_to_get_it() {
    let n = Node::new("a");
    let out = n.cmd(&["tray"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tray"), "{err}");
}
