//! `config.toml`: who this device is, whom it trusts and what it shares.
//!
//! The config is the one source of truth for devices, folders, listen addresses and the
//! API key. It is edited through the operations below — by the daemon (behind the
//! control API) or by the CLI directly when no daemon runs — so both paths give the same
//! result. Every write is atomic (temp file, fsync, rename); a malformed file is reported
//! with its path, line and the offending key, and is never overwritten.
//!
//! Where files live (`Home`): with `--home DIR` everything is under DIR; otherwise the
//! config and key are in the platform config dir and the index in the platform data dir.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::types::DeviceId;

pub const CONFIG_FILE: &str = "config.toml";
pub const INDEX_FILE: &str = "index.db";
/// Written by a running daemon (pid and actual API address), removed when it stops.
pub const DAEMON_FILE: &str = "daemon.json";
/// The marker directory inside every synced folder.
pub const MARKER_DIR: &str = ".ferry";

/// Where this device's files live.
#[derive(Debug, Clone)]
pub struct Home {
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl Home {
    /// `--home DIR` puts everything in DIR; without it, the platform directories.
    pub fn resolve(home: Option<&Path>) -> Result<Home> {
        if let Some(h) = home {
            return Ok(Home {
                config_dir: h.to_path_buf(),
                data_dir: h.to_path_buf(),
            });
        }
        let dirs = directories::ProjectDirs::from("", "", "ferry").ok_or_else(|| {
            Error::Config("cannot find the home directory; pass --home DIR".into())
        })?;
        Ok(Home {
            config_dir: dirs.config_dir().to_path_buf(),
            data_dir: dirs.data_dir().to_path_buf(),
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.config_dir.join(CONFIG_FILE)
    }
    pub fn identity_path(&self) -> PathBuf {
        self.config_dir.join(crate::identity::IDENTITY_FILE)
    }
    pub fn index_path(&self) -> PathBuf {
        self.data_dir.join(INDEX_FILE)
    }
    pub fn daemon_path(&self) -> PathBuf {
        self.config_dir.join(DAEMON_FILE)
    }
    pub fn is_initialised(&self) -> bool {
        self.config_path().exists() && self.identity_path().exists()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FolderType {
    #[default]
    SendReceive,
    SendOnly,
    ReceiveOnly,
}

impl FolderType {
    pub fn as_str(self) -> &'static str {
        match self {
            FolderType::SendReceive => "send-receive",
            FolderType::SendOnly => "send-only",
            FolderType::ReceiveOnly => "receive-only",
        }
    }
}

impl std::str::FromStr for FolderType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "send-receive" | "sendreceive" => Ok(FolderType::SendReceive),
            "send-only" | "sendonly" => Ok(FolderType::SendOnly),
            "receive-only" | "receiveonly" => Ok(FolderType::ReceiveOnly),
            _ => Err(Error::Invalid(format!(
                "unknown folder type {s:?} (send-receive, send-only or receive-only)"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Loopback address of the control API, e.g. "127.0.0.1:8386". Port 0 picks a free
    /// port; the daemon then writes the real one to `daemon.json`.
    pub address: String,
    /// Every API request carries this key (header `X-API-Key`).
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Quiet time after a file-system event before the changed paths are scanned.
    pub watch_debounce_ms: u64,
    /// Keep at least this share of the disk free when pulling; pulling pauses below it.
    pub min_free_percent: f64,
    /// Blocks requested concurrently per file being pulled.
    pub pull_blocks_in_flight: usize,
    /// Blocks over 64 KiB go on a block lane (a second TCP + TLS connection to the
    /// device's listen port, without libp2p's muxer) when the other device has one too;
    /// false sends everything through libp2p. Read at daemon start.
    pub block_lanes: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            watch_debounce_ms: 150,
            min_free_percent: 1.0,
            pull_blocks_in_flight: 16,
            block_lanes: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub id: DeviceId,
    #[serde(default)]
    pub name: String,
    /// Multiaddrs to dial; discovery (mDNS, identify) adds to these at run time.
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersioningConfig {
    /// Only "trashcan" for now: replaced and deleted files go to `.ferry/versions/`.
    #[serde(rename = "type")]
    pub kind: String,
    pub keep_days: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderConfig {
    pub id: String,
    #[serde(default)]
    pub label: String,
    pub path: PathBuf,
    #[serde(rename = "type", default)]
    pub kind: FolderType,
    /// Devices this folder is shared with.
    #[serde(default)]
    pub devices: Vec<DeviceId>,
    /// Seconds between full rescans (the watcher covers the time between them).
    #[serde(default = "default_rescan")]
    pub rescan_interval_s: u64,
    /// Do not apply deletions that come from peers.
    #[serde(default)]
    pub ignore_delete: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub versioning: Option<VersioningConfig>,
}

fn default_rescan() -> u64 {
    3600
}

/// A change to a folder's settings (see `Config::set_folder`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderSettings {
    pub label: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<FolderType>,
    /// "trashcan" or "none".
    pub versioning: Option<String>,
    pub keep_days: Option<u32>,
    pub ignore_delete: Option<bool>,
    pub rescan_interval_s: Option<u64>,
    pub paused: Option<bool>,
}

/// A device that knocked but is not paired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingDevice {
    pub id: DeviceId,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub address: String,
    /// RFC 3339, UTC.
    pub seen: String,
}

/// A folder a paired device offers that this device does not have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingFolder {
    pub id: String,
    #[serde(default)]
    pub label: String,
    pub device: DeviceId,
    pub seen: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub listen: Vec<String>,
    pub api: ApiConfig,
    #[serde(default = "yes")]
    pub mdns: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub options: Options,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default, rename = "folder")]
    pub folders: Vec<FolderConfig>,
    #[serde(default)]
    pub pending_devices: Vec<PendingDevice>,
    #[serde(default)]
    pub pending_folders: Vec<PendingFolder>,
    #[serde(default)]
    pub ignored_devices: Vec<DeviceId>,
    #[serde(default)]
    pub ignored_folders: Vec<String>,
}

fn yes() -> bool {
    true
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Config {
    /// A fresh config: random API key, Syncthing-like default ports.
    pub fn new_default(name: Option<String>) -> Config {
        let name = name.unwrap_or_else(default_device_name);
        let key: [u8; 24] = rand::random();
        Config {
            name,
            listen: vec![
                "/ip4/0.0.0.0/tcp/22000".into(),
                "/ip4/0.0.0.0/udp/22000/quic-v1".into(),
            ],
            api: ApiConfig {
                address: "127.0.0.1:8386".into(),
                key: data_encoding::BASE32_NOPAD.encode(&key).to_lowercase(),
            },
            mdns: true,
            paused: false,
            options: Options::default(),
            devices: vec![],
            folders: vec![],
            pending_devices: vec![],
            pending_folders: vec![],
            ignored_devices: vec![],
            ignored_folders: vec![],
        }
    }

    /// Reads and validates `path`. Errors name the file, the line and the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = fs::read_to_string(path).at(path)?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(0);
            let line_text = text
                .lines()
                .nth(line.saturating_sub(1))
                .unwrap_or("")
                .trim();
            let key = line_text.split('=').next().unwrap_or("").trim();
            Error::Config(format!(
                "{}:{}: invalid config at `{}`: {}",
                path.display(),
                line,
                key,
                e.message()
            ))
        })?;
        cfg.validate()
            .map_err(|m| Error::Config(format!("{}: {m}", path.display())))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        for l in &self.listen {
            l.parse::<libp2p::Multiaddr>()
                .map_err(|e| format!("listen address {l:?} is not a multiaddr: {e}"))?;
        }
        self.api
            .address
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("api.address {:?}: {e}", self.api.address))?;
        if self.api.key.len() < 16 {
            return Err("api.key is too short (at least 16 characters)".into());
        }
        let mut ids = std::collections::HashSet::new();
        for f in &self.folders {
            if !ids.insert(&f.id) {
                return Err(format!("folder id {:?} appears twice", f.id));
            }
        }
        for d in &self.devices {
            for a in &d.addresses {
                a.parse::<libp2p::Multiaddr>()
                    .map_err(|e| format!("device {} address {a:?}: {e}", d.id))?;
            }
        }
        Ok(())
    }

    /// Atomic write: temp file in the same directory, fsync, rename, fsync the directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("cannot encode config: {e}")))?;
        // 0600: the file holds the API key.
        crate::fsutil::write_atomic_mode(path, text.as_bytes(), 0o600)
    }

    pub fn device(&self, id: &DeviceId) -> Option<&DeviceConfig> {
        self.devices.iter().find(|d| &d.id == id)
    }

    pub fn folder(&self, id: &str) -> Option<&FolderConfig> {
        self.folders.iter().find(|f| f.id == id)
    }

    // ---- operations shared by the daemon and the offline CLI ----

    /// Pairs a device (or updates its name/addresses). Removes it from pending/ignored.
    pub fn add_device(
        &mut self,
        id: DeviceId,
        name: Option<String>,
        addrs: Vec<String>,
        own: DeviceId,
    ) -> Result<()> {
        if id == own {
            return Err(Error::Invalid(
                "that is this device's own ID; add the ID of the other device".into(),
            ));
        }
        for a in &addrs {
            a.parse::<libp2p::Multiaddr>()
                .map_err(|e| Error::Invalid(format!("address {a:?} is not a multiaddr: {e}")))?;
        }
        let pending_name = self
            .pending_devices
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.name.clone());
        self.pending_devices.retain(|p| p.id != id);
        self.ignored_devices.retain(|p| p != &id);
        match self.devices.iter_mut().find(|d| d.id == id) {
            Some(d) => {
                if let Some(n) = name {
                    d.name = n;
                }
                for a in addrs {
                    if !d.addresses.contains(&a) {
                        d.addresses.push(a);
                    }
                }
            }
            None => self.devices.push(DeviceConfig {
                id,
                name: name.or(pending_name).unwrap_or_default(),
                addresses: addrs,
            }),
        }
        Ok(())
    }

    pub fn remove_device(&mut self, id: &DeviceId) -> Result<()> {
        let before = self.devices.len();
        self.devices.retain(|d| &d.id != id);
        if before == self.devices.len() {
            return Err(Error::Invalid(format!("device {id} is not paired")));
        }
        for f in &mut self.folders {
            f.devices.retain(|d| d != id);
        }
        self.pending_folders.retain(|p| &p.device != id);
        Ok(())
    }

    pub fn ignore_device(&mut self, id: DeviceId) {
        self.pending_devices.retain(|p| p.id != id);
        if !self.ignored_devices.contains(&id) {
            self.ignored_devices.push(id);
        }
    }

    /// Records a knock from an unknown device. Returns true if it is newly pending.
    pub fn note_pending_device(&mut self, id: DeviceId, name: String, address: String) -> bool {
        if self.device(&id).is_some() || self.ignored_devices.contains(&id) {
            return false;
        }
        match self.pending_devices.iter_mut().find(|p| p.id == id) {
            Some(p) => {
                p.address = address;
                p.seen = now_rfc3339();
                if !name.is_empty() {
                    p.name = name;
                }
                false
            }
            None => {
                self.pending_devices.push(PendingDevice {
                    id,
                    name,
                    address,
                    seen: now_rfc3339(),
                });
                true
            }
        }
    }

    /// Adds a folder at `path`: the path must exist, must not overlap another folder, and
    /// gets the `.ferry/` marker. Returns the folder's ID.
    pub fn add_folder(
        &mut self,
        path: &Path,
        id: Option<String>,
        label: Option<String>,
        kind: FolderType,
    ) -> Result<String> {
        let meta = fs::metadata(path).map_err(|e| {
            Error::Invalid(format!(
                "folder path {} does not exist or cannot be read: {e}",
                path.display()
            ))
        })?;
        if !meta.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        let path = fs::canonicalize(path).at(path)?;
        for f in &self.folders {
            let other = fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
            if path.starts_with(&other) || other.starts_with(&path) {
                return Err(Error::Invalid(format!(
                    "{} overlaps folder {:?} at {}; folders cannot be inside each other",
                    path.display(),
                    f.id,
                    other.display()
                )));
            }
        }
        let id = match id {
            Some(id) => {
                validate_folder_id(&id)?;
                id
            }
            None => generate_folder_id(),
        };
        if self.folder(&id).is_some() {
            return Err(Error::Invalid(format!("a folder with id {id:?} exists")));
        }
        let label = label.unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| id.clone())
        });
        let marker = path.join(MARKER_DIR);
        fs::create_dir_all(&marker).at(&marker)?;
        self.pending_folders.retain(|p| p.id != id);
        self.ignored_folders.retain(|p| p != &id);
        self.folders.push(FolderConfig {
            id: id.clone(),
            label,
            path,
            kind,
            devices: vec![],
            rescan_interval_s: default_rescan(),
            ignore_delete: false,
            paused: false,
            versioning: None,
        });
        Ok(id)
    }

    /// Changes a folder's settings; `None` leaves a setting as it is.
    pub fn set_folder(&mut self, folder: &str, s: FolderSettings) -> Result<()> {
        let f = self
            .folders
            .iter_mut()
            .find(|f| f.id == folder)
            .ok_or_else(|| Error::Invalid(format!("no folder with id {folder:?}")))?;
        if let Some(l) = s.label {
            f.label = l;
        }
        if let Some(t) = s.kind {
            f.kind = t;
        }
        if let Some(v) = s.ignore_delete {
            f.ignore_delete = v;
        }
        if let Some(v) = s.paused {
            f.paused = v;
        }
        if let Some(secs) = s.rescan_interval_s {
            if secs < 10 {
                return Err(Error::Invalid(
                    "rescan interval must be at least 10 seconds".into(),
                ));
            }
            f.rescan_interval_s = secs;
        }
        match s.versioning.as_deref() {
            None => {
                if let (Some(days), Some(v)) = (s.keep_days, f.versioning.as_mut()) {
                    v.keep_days = days;
                }
            }
            Some("none") | Some("") => f.versioning = None,
            Some("trashcan") => {
                f.versioning = Some(VersioningConfig {
                    kind: "trashcan".into(),
                    keep_days: s.keep_days.unwrap_or(30),
                })
            }
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "unknown versioning {other:?} (trashcan or none)"
                )))
            }
        }
        Ok(())
    }

    pub fn share_folder(&mut self, folder: &str, device: DeviceId) -> Result<()> {
        if self.device(&device).is_none() {
            return Err(Error::Invalid(format!(
                "device {device} is not paired; run `ferry device add {device}` first"
            )));
        }
        let f = self
            .folders
            .iter_mut()
            .find(|f| f.id == folder)
            .ok_or_else(|| Error::Invalid(format!("no folder with id {folder:?}")))?;
        if !f.devices.contains(&device) {
            f.devices.push(device);
        }
        Ok(())
    }

    pub fn remove_folder(&mut self, folder: &str) -> Result<()> {
        let before = self.folders.len();
        self.folders.retain(|f| f.id != folder);
        if before == self.folders.len() {
            return Err(Error::Invalid(format!("no folder with id {folder:?}")));
        }
        Ok(())
    }

    /// Records an offer of a folder this device does not have. True if newly pending.
    pub fn note_pending_folder(&mut self, id: &str, label: &str, device: DeviceId) -> bool {
        if self.folder(id).is_some() || self.ignored_folders.iter().any(|f| f == id) {
            return false;
        }
        if let Some(p) = self
            .pending_folders
            .iter_mut()
            .find(|p| p.id == id && p.device == device)
        {
            p.seen = now_rfc3339();
            return false;
        }
        self.pending_folders.push(PendingFolder {
            id: id.to_string(),
            label: label.to_string(),
            device,
            seen: now_rfc3339(),
        });
        true
    }

    /// Accepts an offered folder at `path` (created if missing) and shares it back with
    /// every device that offered it.
    pub fn accept_folder(&mut self, id: &str, path: &Path) -> Result<()> {
        let offers: Vec<PendingFolder> = self
            .pending_folders
            .iter()
            .filter(|p| p.id == id)
            .cloned()
            .collect();
        if offers.is_empty() {
            return Err(Error::Invalid(format!(
                "folder {id:?} is not pending (see `ferry folder pending`)"
            )));
        }
        fs::create_dir_all(path).at(path)?;
        let label = offers[0].label.clone();
        self.add_folder(
            path,
            Some(id.to_string()),
            Some(label),
            FolderType::SendReceive,
        )?;
        for o in offers {
            if self.device(&o.device).is_some() {
                self.share_folder(id, o.device)?;
            }
        }
        Ok(())
    }

    pub fn ignore_folder(&mut self, id: &str) {
        self.pending_folders.retain(|p| p.id != id);
        if !self.ignored_folders.iter().any(|f| f == id) {
            self.ignored_folders.push(id.to_string());
        }
    }
}

pub fn validate_folder_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "folder id {id:?} must be 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

/// Syncthing-style "abcde-fghij" folder IDs.
fn generate_folder_id() -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let r: [u8; 10] = rand::random();
    let s: String = r.iter().map(|b| A[(*b as usize) % 32] as char).collect();
    format!("{}-{}", &s[..5], &s[5..])
}

fn default_device_name() -> String {
    fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ferry-device".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> DeviceId {
        DeviceId([7; 32])
    }

    #[test]
    fn default_config_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CONFIG_FILE);
        let mut c = Config::new_default(Some("laptop".into()));
        c.add_device(DeviceId([1; 32]), Some("desk".into()), vec![], own())
            .unwrap();
        c.save(&p).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
    }

    #[test]
    fn block_lanes_are_on_unless_the_options_say_otherwise() {
        let p = Path::new("/x/config.toml");
        let base = "name = \"a\"\nlisten = []\n[api]\naddress=\"127.0.0.1:1\"\nkey=\"0123456789abcdef0\"\n";
        assert!(Config::parse(base, p).unwrap().options.block_lanes);
        let older = format!("{base}[options]\npull_blocks_in_flight = 8\n");
        assert!(Config::parse(&older, p).unwrap().options.block_lanes);
        let off = format!("{base}[options]\nblock_lanes = false\n");
        assert!(!Config::parse(&off, p).unwrap().options.block_lanes);
    }

    #[test]
    fn malformed_config_names_file_line_and_key() {
        let p = Path::new("/x/config.toml");
        let text = "name = \"a\"\nlisten = []\nmdns = \"yes\"\n[api]\naddress=\"127.0.0.1:1\"\nkey=\"0123456789abcdef0\"\n";
        let err = Config::parse(text, p).unwrap_err().to_string();
        assert!(err.contains("/x/config.toml:3"), "{err}");
        assert!(err.contains("mdns"), "{err}");
    }

    #[test]
    fn folder_add_refuses_missing_and_nested_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::new_default(None);
        assert!(c
            .add_folder(
                &dir.path().join("nope"),
                None,
                None,
                FolderType::SendReceive
            )
            .is_err());
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("b")).unwrap();
        let id = c
            .add_folder(&a, Some("docs".into()), None, FolderType::SendReceive)
            .unwrap();
        assert_eq!(id, "docs");
        assert!(a.join(MARKER_DIR).is_dir());
        let err = c
            .add_folder(&a.join("b"), None, None, FolderType::SendReceive)
            .unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
    }

    #[test]
    fn folder_settings_change_only_what_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::new_default(None);
        c.add_folder(dir.path(), Some("f".into()), None, FolderType::SendReceive)
            .unwrap();
        let set = |v: Option<&str>, d: Option<u32>| FolderSettings {
            versioning: v.map(str::to_string),
            keep_days: d,
            ..Default::default()
        };
        c.set_folder("f", set(Some("trashcan"), Some(7))).unwrap();
        assert_eq!(
            c.folder("f")
                .unwrap()
                .versioning
                .as_ref()
                .unwrap()
                .keep_days,
            7
        );
        c.set_folder("f", set(None, Some(9))).unwrap();
        assert_eq!(
            c.folder("f")
                .unwrap()
                .versioning
                .as_ref()
                .unwrap()
                .keep_days,
            9
        );
        assert!(c.set_folder("f", set(Some("git"), None)).is_err());
        c.set_folder("f", set(Some("none"), None)).unwrap();
        assert!(c.folder("f").unwrap().versioning.is_none());
        assert!(c.set_folder("nope", set(None, None)).is_err());
    }

    #[test]
    fn own_id_and_bad_addresses_are_refused() {
        let mut c = Config::new_default(None);
        assert!(c.add_device(own(), None, vec![], own()).is_err());
        assert!(c
            .add_device(DeviceId([1; 32]), None, vec!["not an addr".into()], own())
            .is_err());
        assert!(c.devices.is_empty());
    }

    #[test]
    fn pending_folder_accept_shares_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::new_default(None);
        let peer = DeviceId([1; 32]);
        c.add_device(peer, None, vec![], own()).unwrap();
        assert!(c.note_pending_folder("docs", "Docs", peer));
        assert!(!c.note_pending_folder("docs", "Docs", peer));
        c.accept_folder("docs", &dir.path().join("docs")).unwrap();
        assert_eq!(c.folder("docs").unwrap().devices, vec![peer]);
        assert!(c.pending_folders.is_empty());
    }
}
