//! `.ferryignore`: which names in a folder are not synced.
//!
//! The file sits at the root of a synced folder and uses gitignore syntax (`*.tmp`,
//! `/build/`, `!keep.tmp`, `**/cache`). Only the root file is read: nested
//! `.ferryignore` files have no effect, so the scanner and the watcher agree on one set of
//! rules. On top of the person's patterns, Ferry always ignores its own files: the
//! `.ferry/` directory at the root (marker and versions) and `.ferry-tmp-*` files anywhere
//! (the puller's temp files).
//!
//! As in git, a name inside an ignored directory is ignored, even if a `!pattern` would
//! re-include it. The `.ferryignore` file itself is an ordinary file and syncs like any
//! other unless it ignores itself.
//!
//! This module only answers "is this name ignored?"; the scanner prunes ignored
//! directories while walking, the watcher drops ignored names from its batches, and the
//! folder loop hands the rules to the index, which leaves names they match unneeded (not
//! pulled, not deleted) on this device.

use std::path::Path;
use std::sync::Arc;

use ::ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::error::{Error, Result};

/// The name of the ignore file at the root of a folder.
pub const IGNORE_FILE: &str = ".ferryignore";
/// Ferry's own directory at the root of every synced folder.
pub const FERRY_DIR: &str = ".ferry";
/// Prefix of the puller's temp files, in the directory of the file being written.
pub const TEMP_PREFIX: &str = ".ferry-tmp-";

/// The compiled ignore rules of one folder. Cheap to clone (the matcher is shared).
#[derive(Clone, Default)]
pub struct Ignores {
    /// `None` when the folder has no patterns: the common case costs no matching at all.
    matcher: Option<Arc<Gitignore>>,
}

impl std::fmt::Debug for Ignores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.matcher.as_ref().map(|m| m.len()).unwrap_or(0);
        write!(f, "Ignores({n} patterns)")
    }
}

impl Ignores {
    /// No patterns: only Ferry's own files are ignored.
    pub fn empty() -> Ignores {
        Ignores { matcher: None }
    }

    /// Reads `<root>/.ferryignore` if present. A missing file means no patterns; a line
    /// that is not a valid pattern is skipped with a warning, the rest still apply.
    pub fn load(root: &Path) -> Result<Ignores> {
        Ok(Self::load_with_text(root)?.1)
    }

    /// Like [`load`](Self::load), and also the text the rules were built from (`""` when
    /// there is no file), so that a change of rules can be told from their text.
    pub fn load_with_text(root: &Path) -> Result<(String, Ignores)> {
        let path = root.join(IGNORE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let rules = Self::build(root, &text, Some(&path));
                Ok((text, rules))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((String::new(), Self::empty()))
            }
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Compiles patterns given as the text of an ignore file (gitignore syntax).
    pub fn from_patterns(text: &str) -> Ignores {
        Self::build(Path::new(""), text, None)
    }

    fn build(root: &Path, text: &str, from: Option<&Path>) -> Ignores {
        let mut builder = GitignoreBuilder::new(root);
        for (i, line) in text.lines().enumerate() {
            if let Err(e) = builder.add_line(from.map(Path::to_path_buf), line) {
                tracing::warn!(
                    "{}:{}: ignoring invalid pattern {line:?}: {e}",
                    from.map(|p| p.display().to_string())
                        .unwrap_or_else(|| IGNORE_FILE.to_string()),
                    i + 1
                );
            }
        }
        match builder.build() {
            Ok(m) if m.is_empty() => Self::empty(),
            Ok(m) => Ignores {
                matcher: Some(Arc::new(m)),
            },
            Err(e) => {
                // Only a failure to compile the whole set lands here; every line was valid
                // on its own. Syncing everything is safer than syncing nothing silently.
                tracing::warn!("{IGNORE_FILE}: patterns could not be compiled, none apply: {e}");
                Self::empty()
            }
        }
    }

    /// True if the folder has patterns of its own (beyond Ferry's built-in ones).
    pub fn has_patterns(&self) -> bool {
        self.matcher.is_some()
    }

    /// Is `name` (relative, `/`-separated) excluded from syncing? `is_dir` tells whether
    /// the name is a directory (patterns ending in `/` match directories only). A name
    /// inside an ignored directory is ignored.
    pub fn is_ignored(&self, name: &str, is_dir: bool) -> bool {
        let name = name.trim_matches('/');
        if name.is_empty() {
            return false;
        }
        if is_builtin(name) {
            return true;
        }
        let Some(m) = &self.matcher else {
            return false;
        };
        // Git semantics: check ancestors top-down; an ignored directory hides everything
        // below it, whatever a later `!pattern` says.
        for (i, _) in name.match_indices('/') {
            if m.matched(&name[..i], true).is_ignore() {
                return true;
            }
        }
        m.matched(name, is_dir).is_ignore()
    }

    /// Like [`is_ignored`](Self::is_ignored) but without checking the ancestors: for a
    /// walker that never descends into ignored directories, where the ancestors are known
    /// to be included already.
    pub(crate) fn is_ignored_entry(&self, name: &str, is_dir: bool) -> bool {
        if is_builtin(name) {
            return true;
        }
        match &self.matcher {
            None => false,
            Some(m) => m.matched(name, is_dir).is_ignore(),
        }
    }
}

/// Ferry's own files: `.ferry` at the root and anything below it, `.ferry-tmp-*` anywhere.
fn is_builtin(name: &str) -> bool {
    if name == FERRY_DIR
        || (name.starts_with(FERRY_DIR) && name.as_bytes().get(FERRY_DIR.len()) == Some(&b'/'))
    {
        return true;
    }
    let base = name.rsplit('/').next().unwrap_or(name);
    base.starts_with(TEMP_PREFIX)
}

/// True for Ferry's temp files (`.ferry-tmp-*`), by base name.
pub fn is_temp_name(name: &str) -> bool {
    name.rsplit('/')
        .next()
        .unwrap_or(name)
        .starts_with(TEMP_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names_are_always_ignored() {
        let ig = Ignores::empty();
        assert!(ig.is_ignored(".ferry", true));
        assert!(ig.is_ignored(".ferry/versions/a.txt", false));
        assert!(ig.is_ignored(".ferry-tmp-a.txt", false));
        assert!(ig.is_ignored("docs/.ferry-tmp-report.pdf", false));
        assert!(
            !ig.is_ignored("docs/.ferry", true),
            ".ferry only counts at the root"
        );
        assert!(!ig.is_ignored(".ferryx", false));
        assert!(!ig.is_ignored(".ferryignore", false));
        assert!(!ig.is_ignored("a.txt", false));
        assert!(!ig.is_ignored("", true));
    }

    #[test]
    fn gitignore_syntax_applies() {
        let ig =
            Ignores::from_patterns("# comment\n*.tmp\n/build/\n!keep.tmp\ncache/\n**/x/*.log\n");
        assert!(ig.is_ignored("a.tmp", false));
        assert!(ig.is_ignored("sub/b.tmp", false));
        assert!(!ig.is_ignored("keep.tmp", false), "negation re-includes");
        assert!(ig.is_ignored("build", true));
        assert!(!ig.is_ignored("build", false), "dir-only pattern");
        assert!(!ig.is_ignored("sub/build", true), "anchored pattern");
        assert!(ig.is_ignored("sub/cache", true));
        assert!(ig.is_ignored("a/x/b.log", false));
        assert!(!ig.is_ignored("a/y/b.log", false));
        assert!(!ig.is_ignored("readme.md", false));
    }

    #[test]
    fn a_name_inside_an_ignored_directory_is_ignored() {
        let ig = Ignores::from_patterns("build/\n!build/keep.txt\nnode_modules\n");
        assert!(ig.is_ignored("build/out/a.o", false));
        assert!(
            ig.is_ignored("build/keep.txt", false),
            "git cannot re-include below an ignored dir"
        );
        assert!(ig.is_ignored("web/node_modules/x/index.js", false));
        assert!(!ig.is_ignored("web/src/index.js", false));
    }

    #[test]
    fn load_reads_the_root_file_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ig = Ignores::load(dir.path()).unwrap();
        assert!(!ig.has_patterns());
        assert!(!ig.is_ignored("a.log", false));
        std::fs::write(dir.path().join(IGNORE_FILE), "*.log\n[invalid\n").unwrap();
        let ig = Ignores::load(dir.path()).unwrap();
        assert!(ig.has_patterns());
        assert!(ig.is_ignored("a.log", false));
        assert!(ig.is_ignored("deep/down/a.log", false));
        assert!(!ig.is_ignored("a.txt", false));
        let clone = ig.clone();
        assert!(clone.is_ignored("a.log", false));
    }
}
