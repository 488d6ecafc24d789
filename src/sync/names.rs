//! Names from peers are untrusted: this module is the gate they pass before anything
//! touches the disk.
//!
//! [`check_name`] is a pure check of the string: relative, `/`-separated, Unicode NFC,
//! no `.`/`..`/empty components, nothing Ferry reserves for itself (`.ferry/` at the top,
//! `.ferry-tmp-*` temp files), and nothing this OS cannot store. [`safe_join`] then looks
//! at the disk: the name may not reach its target through a symlinked directory, so a
//! peer can never make us write outside the folder by naming `link-to-etc/passwd`.
//!
//! What it does not do: decide whether a name is *ignored* (that is `.ferryignore`), or
//! protect against a local process swapping a directory for a symlink between the check
//! and the write (a local attacker with write access to the folder can do worse anyway).

use std::io;
use std::path::{Path, PathBuf};

use unicode_normalization::is_nfc;

use crate::error::Error;
use crate::fsutil::{is_temp_name, MAX_NAME_BYTES};

/// The folder's own directory (marker, versions); never synced.
pub const FERRY_DIR: &str = ".ferry";

/// Why a name from a peer is refused. Every variant carries the name, quoted as received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty file name")]
    Empty,
    #[error("{0:?}: absolute paths are not allowed in a folder")]
    Absolute(String),
    #[error("{0:?}: contains a NUL byte")]
    Nul(String),
    #[error("{0:?}: not in Unicode NFC form")]
    NotNfc(String),
    #[error("{0:?}: has an empty path component (leading, trailing or double '/')")]
    EmptyComponent(String),
    #[error("{0:?}: '.' and '..' components are not allowed")]
    DotComponent(String),
    #[error("{0:?}: '.ferry' at the top of a folder is reserved for Ferry itself")]
    Reserved(String),
    #[error("{0:?}: names starting with '.ferry-tmp-' are Ferry's temp files")]
    TempName(String),
    #[error("{name:?}: component of {len} bytes is longer than the limit of 255")]
    ComponentTooLong { name: String, len: usize },
    #[error("{name:?}: {why} (not a valid file name on this system)")]
    InvalidOnThisOs { name: String, why: &'static str },
    #[error("{name:?}: {parent:?} is a symlink; refusing to write through it")]
    SymlinkInPath { name: String, parent: String },
    #[error("{name:?}: {parent:?} is not a directory")]
    ParentNotDirectory { name: String, parent: String },
    #[error("{name:?}: cannot inspect {parent:?}: {msg}")]
    Inaccessible {
        name: String,
        parent: String,
        msg: String,
    },
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        Error::Invalid(format!("refused file name {e}"))
    }
}

/// Checks a name received from a peer (or about to be sent): `Ok` means it is a plain
/// relative name that stays inside the folder as far as the string alone can tell.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let owned = || name.to_string();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.contains('\0') {
        return Err(NameError::Nul(owned()));
    }
    if name.starts_with('/') {
        return Err(NameError::Absolute(owned()));
    }
    if !is_nfc(name) {
        return Err(NameError::NotNfc(owned()));
    }
    #[cfg(windows)]
    windows::check(name)?;
    for (i, comp) in name.split('/').enumerate() {
        if comp.is_empty() {
            return Err(NameError::EmptyComponent(owned()));
        }
        if comp == "." || comp == ".." {
            return Err(NameError::DotComponent(owned()));
        }
        // Case-insensitive: on macOS and Windows `.FERRY` is the same directory.
        if i == 0 && comp.eq_ignore_ascii_case(FERRY_DIR) {
            return Err(NameError::Reserved(owned()));
        }
        if is_temp_name(comp) {
            return Err(NameError::TempName(owned()));
        }
        if comp.len() > MAX_NAME_BYTES {
            return Err(NameError::ComponentTooLong {
                name: owned(),
                len: comp.len(),
            });
        }
        #[cfg(windows)]
        windows::check_component(name, comp)?;
    }
    Ok(())
}

/// Checks `name` and joins it to `root`, after verifying on disk that no *existing*
/// directory between `root` and the target is a symlink or a non-directory. Components
/// that do not exist yet are fine (the puller creates them, re-checking each). The
/// target itself may be a symlink: callers replace or delete the link, never follow it.
pub fn safe_join(root: &Path, name: &str) -> Result<PathBuf, NameError> {
    safe_join_parents(root, name).map(|(path, _)| path)
}

/// [`safe_join`], and whether every directory between `root` and the target exists
/// (checked as it went): then a caller need not look at them again.
pub fn safe_join_parents(root: &Path, name: &str) -> Result<(PathBuf, bool), NameError> {
    check_name(name)?;
    let comps: Vec<&str> = name.split('/').collect();
    let mut path = root.to_path_buf();
    for (i, comp) in comps[..comps.len() - 1].iter().enumerate() {
        path.push(comp);
        let parent = || comps[..=i].join("/");
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(NameError::SymlinkInPath {
                    name: name.to_string(),
                    parent: parent(),
                })
            }
            Ok(md) if !md.is_dir() => {
                return Err(NameError::ParentNotDirectory {
                    name: name.to_string(),
                    parent: parent(),
                })
            }
            Ok(_) => {}
            // Nothing further down can exist either.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                path.extend(&comps[i + 1..]);
                return Ok((path, false));
            }
            Err(e) => {
                return Err(NameError::Inaccessible {
                    name: name.to_string(),
                    parent: parent(),
                    msg: e.to_string(),
                })
            }
        }
    }
    path.push(comps[comps.len() - 1]);
    Ok((path, true))
}

#[cfg(windows)]
mod windows {
    //! Names Windows cannot store: reserved characters, device names, trailing dots.
    use super::NameError;

    pub(super) fn check(name: &str) -> Result<(), NameError> {
        let bad = |c: char| matches!(c, '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|') || c < ' ';
        if name.chars().any(bad) {
            return Err(NameError::InvalidOnThisOs {
                name: name.to_string(),
                why: "contains a character Windows does not allow (\\ : * ? \" < > | or a control character)",
            });
        }
        Ok(())
    }

    pub(super) fn check_component(name: &str, comp: &str) -> Result<(), NameError> {
        if comp.ends_with('.') || comp.ends_with(' ') {
            return Err(NameError::InvalidOnThisOs {
                name: name.to_string(),
                why: "a component ends with '.' or ' '",
            });
        }
        let stem = comp.split('.').next().unwrap_or("").to_ascii_uppercase();
        let reserved = matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
            || ((stem.starts_with("COM") || stem.starts_with("LPT"))
                && stem.len() == 4
                && stem.as_bytes()[3].is_ascii_digit());
        if reserved {
            return Err(NameError::InvalidOnThisOs {
                name: name.to_string(),
                why: "a component is a reserved device name (CON, PRN, AUX, NUL, COMn, LPTn)",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for n in [
            "a",
            "a.txt",
            "dir/sub/file.tar.gz",
            ".bashrc",
            ".ferryignore",
            "x/.ferry",
            "x/.ferry/y",
            "..a",
            "a..",
            "...",
            "caf\u{e9}",
            "日本語/ファイル",
            "spaces in name",
            "with\\backslash",
        ] {
            #[cfg(windows)]
            if n.contains('\\') {
                continue;
            }
            assert_eq!(check_name(n), Ok(()), "{n:?}");
        }
        assert_eq!(check_name(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn bad_names_are_refused_with_the_right_reason() {
        use NameError::*;
        type Expect = fn(&NameError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("", |e| matches!(e, Empty)),
            ("/etc/passwd", |e| matches!(e, Absolute(_))),
            ("/", |e| matches!(e, Absolute(_))),
            ("a\0b", |e| matches!(e, Nul(_))),
            ("cafe\u{301}", |e| matches!(e, NotNfc(_))),
            ("a//b", |e| matches!(e, EmptyComponent(_))),
            ("a/", |e| matches!(e, EmptyComponent(_))),
            ("..", |e| matches!(e, DotComponent(_))),
            ("../x", |e| matches!(e, DotComponent(_))),
            ("a/../../x", |e| matches!(e, DotComponent(_))),
            ("a/./b", |e| matches!(e, DotComponent(_))),
            (".", |e| matches!(e, DotComponent(_))),
            (".ferry", |e| matches!(e, Reserved(_))),
            (".ferry/versions/x", |e| matches!(e, Reserved(_))),
            (".FERRY/x", |e| matches!(e, Reserved(_))),
            (".ferry-tmp-a", |e| matches!(e, TempName(_))),
            ("d/.ferry-tmp-a", |e| matches!(e, TempName(_))),
        ];
        for (name, ok) in cases {
            let e = check_name(name).expect_err(name);
            assert!(ok(&e), "{name:?} gave {e:?}");
            assert!(!e.to_string().is_empty());
        }
        let long = format!("d/{}", "a".repeat(256));
        assert!(matches!(
            check_name(&long),
            Err(ComponentTooLong { len: 256, .. })
        ));
    }

    #[test]
    fn errors_say_which_name() {
        let e = check_name("a/../b").unwrap_err();
        assert!(e.to_string().contains("a/../b"), "{e}");
        let e: Error = e.into();
        assert!(e.to_string().contains("a/../b"), "{e}");
    }

    #[test]
    fn safe_join_joins_plain_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(safe_join(root, "a/b/c").unwrap(), root.join("a/b/c"));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        assert_eq!(safe_join(root, "a/b/c").unwrap(), root.join("a/b/c"));
        assert!(safe_join(root, "../x").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn safe_join_refuses_a_path_through_a_symlinked_directory() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("real/escape")).unwrap();
        let e = safe_join(root, "real/escape/passwd").unwrap_err();
        assert!(
            matches!(&e, NameError::SymlinkInPath { parent, .. } if parent == "real/escape"),
            "{e:?}"
        );
        assert!(safe_join(root, "real/escape/deeper/x").is_err());
        // The link itself is a legal target: it is replaced or deleted, never followed.
        assert_eq!(
            safe_join(root, "real/escape").unwrap(),
            root.join("real/escape")
        );
        std::fs::write(root.join("file"), b"x").unwrap();
        assert!(matches!(
            safe_join(root, "file/child"),
            Err(NameError::ParentNotDirectory { .. })
        ));
    }
}
