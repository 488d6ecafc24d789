//! End-to-end tests: real `ferry` processes, each with its own `--home` in a temp dir,
//! talking over 127.0.0.1 only, mDNS off. Files on disk are the proof.
//!
//! Modules:
//! - `common`: start/stop nodes, run CLI commands, wait for conditions (never sleep-and-hope)
//! - `cli`: init, id format, typo refusal, folder add, config errors (no daemon)
//! - `daemon`: indexing, the watcher, status --json, SIGTERM
//! - `peers`: pairing, pending devices and folders, API key, invites, reconnects
//! - `sync`: files converge: create, modify, delete, rename, conflicts, folder types

mod common;

mod cli;
mod daemon;
mod desktop;
mod peers;
mod resume;
mod stress;
mod sync;
