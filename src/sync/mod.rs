//! Sync: everything that turns indexes into identical folders.
//!
//! - `names`: untrusted names from peers are checked before anything touches the disk.
//! - `conflict`: conflict copy names, and the rule of who wins.
//! - `puller`: builds a needed file in a temp file from local and remote blocks, verifies
//!   every block, re-checks the target and renames it into place; deletions; directories;
//!   symlinks; versioning.

pub mod conflict;
pub mod names;
pub mod puller;
