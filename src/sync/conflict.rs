//! Conflict copies: the names under which losing content is kept.
//!
//! When two devices change a name concurrently, every device picks the same winner
//! (`FileInfo::wins_conflict_over`: later mtime, ties to the larger device) and the losing
//! content is kept beside it as
//! `dir/base.sync-conflict-YYYYMMDD-HHMMSS-<first 7 chars of the losing device's ID>.ext`,
//! exactly Syncthing's shape, so people and tools that know one know the other. The
//! conflict copy is an ordinary file from then on: it is scanned and synced like any other.
//! No edit is ever silently dropped.
//!
//! This module only names things; `puller` does the moving.

use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use crate::fsutil::{floor_char_boundary, MAX_NAME_BYTES};
use crate::types::DeviceId;

/// The marker between the original stem and the timestamp.
pub const CONFLICT_MARKER: &str = ".sync-conflict-";

/// The conflict-copy name for `name` (a relative `/`-separated name), stamped with `when`
/// (converted to UTC) and the first 7 characters of `device` (the device whose version
/// lost). The extension is what follows the last dot of the basename, unless that dot is
/// the first character (`.bashrc` has none). A stem too long for the 255-byte limit is
/// cut at a character boundary so the result is always a valid name.
pub fn conflict_name(name: &str, when: OffsetDateTime, device: &DeviceId) -> String {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", name),
    };
    let (stem, ext) = match base.rfind('.') {
        Some(i) if i > 0 => (&base[..i], &base[i..]),
        _ => (base, ""),
    };
    let stamp = when
        .to_offset(UtcOffset::UTC)
        .format(format_description!(
            "[year][month][day]-[hour][minute][second]"
        ))
        .unwrap_or_else(|_| "00000000-000000".to_string());
    let tag = format!("{CONFLICT_MARKER}{stamp}-{}", device.prefix7());
    let room = MAX_NAME_BYTES.saturating_sub(tag.len() + ext.len());
    let stem = &stem[..floor_char_boundary(stem, room)];
    format!("{dir}{stem}{tag}{ext}")
}

/// True when the basename of `name` carries a conflict tag:
/// `.sync-conflict-` + 8 digits + `-` + 6 digits + `-` + 7 base32 characters.
pub fn is_conflict_name(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.match_indices(CONFLICT_MARKER)
        .any(|(i, m)| is_tag(&base.as_bytes()[i + m.len()..]))
}

/// `YYYYMMDD-HHMMSS-XXXXXXX` at the start of `rest`, followed by the end or an extension.
fn is_tag(rest: &[u8]) -> bool {
    const LEN: usize = 8 + 1 + 6 + 1 + 7;
    if rest.len() < LEN {
        return false;
    }
    let t = &rest[..LEN];
    let digits = |r: std::ops::Range<usize>| t[r].iter().all(u8::is_ascii_digit);
    let id_ok = t[16..]
        .iter()
        .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(c));
    digits(0..8)
        && t[8] == b'-'
        && digits(9..15)
        && t[15] == b'-'
        && id_ok
        && (rest.len() == LEN || rest[LEN] == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn dev() -> DeviceId {
        "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2"
            .parse()
            .unwrap()
    }

    #[test]
    fn names_follow_syncthing_shape() {
        let when = datetime!(2024-03-05 07:08:09 UTC);
        let d = dev();
        assert_eq!(
            conflict_name("a/b/report.final.txt", when, &d),
            "a/b/report.final.sync-conflict-20240305-070809-P56IOI7.txt"
        );
        assert_eq!(
            conflict_name(".bashrc", when, &d),
            ".bashrc.sync-conflict-20240305-070809-P56IOI7"
        );
        assert_eq!(
            conflict_name("noext", when, &d),
            "noext.sync-conflict-20240305-070809-P56IOI7"
        );
        assert_eq!(
            conflict_name("x/.config.toml", when, &d),
            "x/.config.sync-conflict-20240305-070809-P56IOI7.toml"
        );
        assert_eq!(
            conflict_name("dir.d/noext", when, &d),
            "dir.d/noext.sync-conflict-20240305-070809-P56IOI7",
            "a dot in the directory is not an extension"
        );
    }

    #[test]
    fn the_stamp_is_utc() {
        let when = datetime!(2024-03-05 23:30:00 -02:00);
        assert_eq!(
            conflict_name("f.txt", when, &dev()),
            "f.sync-conflict-20240306-013000-P56IOI7.txt"
        );
    }

    #[test]
    fn conflict_names_are_recognised() {
        let when = datetime!(2024-03-05 07:08:09 UTC);
        for n in ["a/b/report.final.txt", ".bashrc", "noext", "x.tar.gz"] {
            let c = conflict_name(n, when, &dev());
            assert!(is_conflict_name(&c), "{c}");
            assert!(!is_conflict_name(n), "{n}");
            assert_eq!(crate::sync::names::check_name(&c), Ok(()));
        }
        assert!(!is_conflict_name("a.sync-conflict-2024.txt"));
        assert!(!is_conflict_name(
            "a.sync-conflict-20240305-070809-P56IOI7/b.txt"
        ));
        assert!(!is_conflict_name("a.sync-conflict-20240305-070809-p56ioi7"));
    }

    #[test]
    fn long_names_are_cut_to_a_valid_length() {
        let when = datetime!(2024-03-05 07:08:09 UTC);
        let base = format!("{}.txt", "ü".repeat(125)); // 254 bytes
        let c = conflict_name(&format!("d/{base}"), when, &dev());
        let cb = c.strip_prefix("d/").unwrap();
        assert!(cb.len() <= MAX_NAME_BYTES, "{}", cb.len());
        assert!(cb.ends_with("-P56IOI7.txt"));
        assert!(is_conflict_name(&c));
    }
}
