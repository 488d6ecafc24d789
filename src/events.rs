//! Events: what the engine tells the outside world (API event stream, tray, logs).
//!
//! A bounded broadcast channel carries them; a slow subscriber loses old events (and is
//! told so by the channel), it never slows the engine down.

use serde::Serialize;

use crate::types::DeviceId;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    DeviceConnected {
        device: DeviceId,
        address: String,
    },
    DeviceDisconnected {
        device: DeviceId,
    },
    PendingDevice {
        device: DeviceId,
        name: String,
        address: String,
    },
    PendingFolder {
        folder: String,
        label: String,
        device: DeviceId,
    },
    FolderState {
        folder: String,
        state: String,
        error: Option<String>,
    },
    /// A file was scanned and committed locally (count of records in the batch).
    LocalIndexUpdated {
        folder: String,
        files: usize,
    },
    /// A file arrived from a peer (or failed to).
    ItemFinished {
        folder: String,
        name: String,
        action: String,
        error: Option<String>,
    },
    RemoteIndexUpdated {
        folder: String,
        device: DeviceId,
        files: usize,
    },
    ConfigChanged,
    Error {
        folder: Option<String>,
        message: String,
    },
}

pub type EventSender = tokio::sync::broadcast::Sender<Event>;

/// Capacity of the event channel: enough for a burst of per-file events.
pub const EVENT_CAPACITY: usize = 4096;
