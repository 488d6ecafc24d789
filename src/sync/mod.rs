//! Sync: everything that turns indexes into identical folders.
//!
//! - `names`: untrusted names from peers are checked before anything touches the disk.
//! - `conflict`: conflict copy names, and the rule of who wins.
//! - `puller`: builds a needed file in a temp file from local and remote blocks, verifies
//!   every block, re-checks the target and renames it into place; deletions; directories;
//!   symlinks; versioning.
//! - `source`: where the puller's blocks come from (local data first, then peers).
//! - `folder`: one loop per folder running scans and pulls.
//! - `exchange`: cluster configs and index batches with connected devices.
//! - `responder`: serves block requests from peers.

pub mod conflict;
pub mod exchange;
pub mod folder;
pub mod names;
pub mod puller;
pub mod responder;
pub mod source;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{Config, FolderConfig};
use crate::events::{Event, EventSender};
use crate::index::Index;
use crate::net::NetHandle;
use crate::types::DeviceId;

/// What every sync task shares: the actors' handles and the current config. Built once
/// by the daemon; cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    pub own: DeviceId,
    pub index: Index,
    pub net: NetHandle,
    pub config: Arc<RwLock<Config>>,
    pub events: EventSender,
    pub folders: Arc<Mutex<HashMap<String, folder::FolderHandle>>>,
    pub connected: Arc<Mutex<HashSet<DeviceId>>>,
    /// Where `config` is saved after every change.
    pub config_path: std::path::PathBuf,
}

impl Ctx {
    pub fn folder_config(&self, id: &str) -> Option<FolderConfig> {
        self.config.read().ok()?.folder(id).cloned()
    }

    /// Is `folder` configured here and shared with `device`?
    pub fn shared_with(&self, id: &str, device: &DeviceId) -> Option<FolderConfig> {
        self.folder_config(id)
            .filter(|f| f.devices.contains(device))
    }

    /// The ignore rules of `folder` as its loop last read them; `None` while it has not
    /// (or the folder has no loop here).
    pub fn folder_ignores(&self, folder: &str) -> Option<crate::ignore::Ignores> {
        let folders = self.folders.lock().ok()?;
        let rt = folders.get(folder)?.runtime.lock().ok()?;
        rt.ignores.clone()
    }

    /// Changes the config and saves it atomically; nothing changes if `f` or the save
    /// fails. Callers that change devices or folders then ask the daemon to reconcile.
    pub fn edit_config<R>(
        &self,
        f: impl FnOnce(&mut Config) -> crate::Result<R>,
    ) -> crate::Result<R> {
        let mut guard = self.config.write().map_err(|_| crate::Error::Stopped)?;
        let mut next = guard.clone();
        let r = f(&mut next)?;
        if next != *guard {
            next.save(&self.config_path)?;
            *guard = next;
        }
        Ok(r)
    }

    pub fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    pub fn is_connected(&self, d: &DeviceId) -> bool {
        self.connected
            .lock()
            .map(|c| c.contains(d))
            .unwrap_or(false)
    }

    /// The full device ID for a short ID in a version vector, if known.
    pub fn device_by_short(&self, short: u64) -> Option<DeviceId> {
        if self.own.short() == short {
            return Some(self.own);
        }
        let cfg = self.config.read().ok()?;
        cfg.devices
            .iter()
            .map(|d| d.id)
            .find(|d| d.short() == short)
    }
}
