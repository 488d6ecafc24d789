//! Ferry keeps folders identical across a person's devices, peer to peer.
//!
//! # The crate map
//!
//! ```text
//! types      leaf: DeviceId, FileInfo, Block, VersionVector and the version rules
//! protocol   the wire messages and their size limits
//! identity   the ed25519 key under --home, and the DeviceId / PeerId it gives
//! config     config.toml: devices, folders, listen addresses, API key
//! ignore     .ferryignore matching
//! bufpool    block buffers kept for reuse by the block transfer (both sides)
//! mem        the allocator's free memory given back after jobs over many names
//! fsutil     file-system helpers: temp files, fsync, mtimes, modes, safe names
//! scanner    walks a folder, chunks (FastCDC) and hashes (BLAKE3) what changed
//! watcher    notify events -> debounced sets of paths to scan
//! index      the SQLite actor: local and remote records, global version, need, blocks
//! net        the libp2p event loop: transports, gating, index/block/join protocols
//! sync       folder loops, index exchange, the puller, the block responder, conflicts
//! demo       `ferry demo`: two engines in one process, syncing over loopback
//! daemon     builds every actor and channel and runs the engine until shutdown
//! api        the control API (HTTP+JSON on loopback, API key, server-sent events)
//! client     the CLI's side of the control API
//! events     what the engine reports (API event stream, tray)
//! invite     one-line invites for one-step pairing
//! cli        the commands, run either against a daemon or directly on config.toml
//! tray_model what the tray shows for a status snapshot (state, tooltip, menu) and its icons
//! tray       the tray icon (cargo feature `tray`), a client of the control API
//! autostart  start at login: XDG autostart entry, LaunchAgent, Run key
//! ```
//!
//! # The path of a change
//!
//! A write on disk wakes the `watcher`, which after a short debounce hands the changed
//! paths to the `scanner`. The scanner compares them with the `index`, chunks and hashes
//! what changed and commits new local records (bumped version, next sequence). The
//! `sync` folder loop sends those records to every connected device that shares the
//! folder through `net`. On the other side the records land in that device's `index`,
//! which recomputes the global version of each name and whether the device needs it (not
//! when its own `.ferryignore` matches the name, nor a deletion where deletions are
//! ignored); the puller then builds each needed file in a temp file, from local blocks
//! first and from peers second, verifies every block, re-checks the target and renames it
//! into place.

pub mod api;
pub mod autostart;
pub mod bufpool;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod error;
pub mod events;
pub mod fsutil;
pub mod identity;
pub mod ignore;
pub mod index;
pub mod invite;
pub mod mem;
pub mod net;
pub mod protocol;
pub mod scanner;
pub mod sync;
#[cfg(feature = "tray")]
pub mod tray;
pub mod tray_model;
pub mod types;
pub mod watcher;

pub use error::{Error, Result};
