//! The `ferry` commands.
//!
//! Commands that change config go through the control API when a daemon runs for this
//! home (it applies them at once) and edit `config.toml` directly otherwise, with the
//! same operations from `config`, so the result is the same either way.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::client::Client;
use crate::config::{Config, FolderType, Home};
use crate::daemon::{self, RunOptions, Status};
use crate::identity::Identity;
use crate::types::DeviceId;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Keep folders identical across your devices, peer to peer"
)]
pub struct Cli {
    /// Directory holding config.toml, identity.key and index.db (default: the platform
    /// config and data directories).
    #[arg(long, global = true, env = "FERRY_HOME")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create this device's identity and config (keeps an existing identity).
    Init(InitArgs),
    /// Print this device's ID.
    Id,
    /// Run the daemon in the foreground.
    Run {
        /// Do not use mDNS local discovery for this run.
        #[arg(long)]
        no_mdns: bool,
    },
    /// Show the tray icon (starts the engine in-process if no daemon answers).
    Tray,
    /// Show folders and devices.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Paired devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Synced folders.
    #[command(subcommand)]
    Folder(FolderCmd),
    /// Rescan a folder (or all) now.
    Scan { folder: Option<String> },
    /// Pause syncing of every folder.
    Pause,
    /// Resume syncing.
    Resume,
    /// Start Ferry at login.
    Autostart {
        #[arg(value_parser = ["enable", "disable", "status"])]
        action: String,
    },
    /// Print a one-time invite that pairs another device in one step.
    Invite {
        #[arg(long)]
        folder: Option<String>,
    },
    /// Pair with the device that made INVITE (and take its folder, if it names one).
    Join {
        invite: String,
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Two local devices syncing a sample folder, on loopback.
    Demo {
        /// Exit after the demonstration instead of waiting for Ctrl-C.
        #[arg(long)]
        no_wait: bool,
        /// Keep the demo's temp directory when it ends.
        #[arg(long)]
        keep: bool,
    },
    /// Run a libp2p relay node for devices behind NAT (uses this home's identity).
    Relay {
        /// Listen multiaddr (repeatable); default /ip4/0.0.0.0/tcp/22067
        #[arg(long)]
        listen: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[arg(long)]
    pub name: Option<String>,
    /// Listen multiaddr (repeatable), e.g. /ip4/0.0.0.0/tcp/22000
    #[arg(long)]
    pub listen: Vec<String>,
    /// Control API address (loopback), e.g. 127.0.0.1:8386
    #[arg(long)]
    pub api: Option<String>,
    #[arg(long)]
    pub no_mdns: bool,
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Pair with a device by its ID.
    Add {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Address to dial (repeatable), e.g. /ip4/192.168.1.5/tcp/22000
        #[arg(long = "addr")]
        addrs: Vec<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Remove {
        id: String,
    },
    /// Devices that tried to connect but are not paired.
    Pending {
        #[arg(long)]
        json: bool,
    },
    Accept {
        id: String,
    },
    Ignore {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum FolderCmd {
    /// Start syncing the folder at PATH.
    Add {
        path: PathBuf,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long = "type", default_value = "send-receive")]
        kind: String,
    },
    /// Share a folder with a paired device.
    Share {
        folder: String,
        device: String,
    },
    /// Change a folder's settings.
    Set {
        folder: String,
        #[arg(long)]
        label: Option<String>,
        #[arg(long = "type")]
        kind: Option<String>,
        /// Keep replaced and deleted files in .ferry/versions: trashcan, or none.
        #[arg(long)]
        versioning: Option<String>,
        /// Days to keep versioned files (0 = forever).
        #[arg(long)]
        keep_days: Option<u32>,
        /// Do not apply deletions that come from other devices.
        #[arg(long)]
        ignore_delete: Option<bool>,
        /// Seconds between full rescans.
        #[arg(long)]
        rescan_interval: Option<u64>,
        #[arg(long)]
        paused: Option<bool>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    /// Folders other devices offer.
    Pending {
        #[arg(long)]
        json: bool,
    },
    Accept {
        folder: String,
        path: PathBuf,
    },
    Ignore {
        folder: String,
    },
    /// Receive-only folders: undo local changes (restore what the other devices have).
    Revert {
        folder: String,
    },
    /// Stop syncing a folder (files stay on disk).
    Remove {
        folder: String,
    },
}

/// Runs a command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let home = Home::resolve(cli.home.as_deref())?;
    match cli.cmd {
        Command::Init(a) => init(&home, a),
        Command::Id => {
            let id = load_identity(&home)?;
            println!("{}", id.device_id());
            Ok(0)
        }
        Command::Run { no_mdns } => run_daemon(home, no_mdns),
        Command::Status { json } => status(&home, json),
        Command::Device(c) => device(&home, c),
        Command::Folder(c) => folder(&home, c),
        Command::Scan { folder } => scan(&home, folder),
        Command::Pause => pause(&home, true),
        Command::Resume => pause(&home, false),
        Command::Invite { folder } => invite(&home, folder),
        Command::Join { invite, path } => join(&home, &invite, path),
        #[cfg(feature = "tray")]
        Command::Tray => crate::tray::run(home, cli.home.as_deref()),
        #[cfg(not(feature = "tray"))]
        Command::Tray => crate::tray_model::tray_not_built(),
        Command::Autostart { action } => crate::autostart::run(&action, cli.home.as_deref()),
        Command::Demo { no_wait, keep } => {
            crate::demo::run(crate::demo::DemoOptions { no_wait, keep })?;
            Ok(0)
        }
        Command::Relay { listen } => relay(&home, listen),
    }
}

fn load_identity(home: &Home) -> anyhow::Result<Identity> {
    let p = home.identity_path();
    if !p.exists() {
        bail!(
            "this device is not initialised ({} is missing); run `ferry init` first",
            p.display()
        );
    }
    Ok(Identity::load(&p)?)
}

fn load_config(home: &Home) -> anyhow::Result<Config> {
    let p = home.config_path();
    if !p.exists() {
        bail!(
            "this device is not initialised ({} is missing); run `ferry init` first",
            p.display()
        );
    }
    Ok(Config::load(&p)?)
}

/// Changes config.toml directly (no daemon running).
fn edit_offline<R>(
    home: &Home,
    f: impl FnOnce(&mut Config) -> crate::Result<R>,
) -> anyhow::Result<R> {
    let mut cfg = load_config(home)?;
    let r = f(&mut cfg)?;
    cfg.save(&home.config_path())?;
    Ok(r)
}

fn client(home: &Home) -> anyhow::Result<Option<Client>> {
    let cfg = load_config(home)?;
    Ok(Client::connect(home, &cfg))
}

fn init(home: &Home, a: InitArgs) -> anyhow::Result<i32> {
    let existed = home.is_initialised();
    let id = Identity::load_or_create(&home.identity_path())?;
    let mut cfg = if home.config_path().exists() {
        Config::load(&home.config_path())?
    } else {
        Config::new_default(None)
    };
    if let Some(n) = a.name {
        cfg.name = n;
    }
    if !a.listen.is_empty() {
        for l in &a.listen {
            l.parse::<libp2p::Multiaddr>()
                .map_err(|e| anyhow!("--listen {l:?} is not a multiaddr: {e}"))?;
        }
        cfg.listen = a.listen;
    }
    if let Some(api) = a.api {
        let sa: std::net::SocketAddr = api
            .parse()
            .map_err(|e| anyhow!("--api {api:?} is not an address like 127.0.0.1:8386: {e}"))?;
        if !sa.ip().is_loopback() {
            bail!("--api must be a loopback address (127.0.0.1 or ::1)");
        }
        cfg.api.address = api;
    }
    if a.no_mdns {
        cfg.mdns = false;
    }
    cfg.save(&home.config_path())?;
    if existed {
        println!("Kept the existing identity.");
    }
    println!("Device ID: {}", id.device_id());
    println!("Config:    {}", home.config_path().display());
    Ok(0)
}

fn run_daemon(home: Home, no_mdns: bool) -> anyhow::Result<i32> {
    init_tracing();
    daemon::use_batch_scheduling();
    let rt = daemon::engine_runtime()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        daemon::run(home, RunOptions { no_mdns }, shutdown).await
    })?;
    Ok(0)
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn need_daemon(home: &Home) -> anyhow::Result<Client> {
    client(home)?.ok_or_else(|| {
        anyhow!("Ferry is not running for this home; start it with `ferry run` (or `ferry tray`)")
    })
}

fn status(home: &Home, as_json: bool) -> anyhow::Result<i32> {
    let c = need_daemon(home)?;
    let st: Status = c.get("/rest/status")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(0);
    }
    println!("{}  {}", st.name, st.device_id);
    println!("listening on {}", st.listen.join(", "));
    if st.paused {
        println!("PAUSED");
    }
    println!("\nFolders:");
    if st.folders.is_empty() {
        println!("  (none; add one with `ferry folder add PATH`)");
    }
    for f in &st.folders {
        println!(
            "  {:<12} {:<10} {:>5.1}%  {} files, {}  {}",
            f.id,
            f.state,
            f.completion,
            f.local_files,
            human_bytes(f.local_bytes),
            f.path
        );
        if f.need_files > 0 {
            println!(
                "               needs {} files, {}",
                f.need_files,
                human_bytes(f.need_bytes)
            );
        }
        if let Some(e) = &f.error {
            println!("               error: {e}");
        }
        if f.local_changes > 0 {
            println!(
                "               {} local changes not sent (receive-only; `ferry folder revert {}` undoes them)",
                f.local_changes, f.id
            );
        }
        for e in f.pull_errors.iter().take(5) {
            println!("               cannot sync {}: {}", e.name, e.error);
        }
    }
    println!("\nDevices:");
    if st.devices.is_empty() {
        println!("  (none; pair one with `ferry device add ID` or `ferry invite`)");
    }
    for d in &st.devices {
        let conn = if d.connected {
            format!(
                "connected {} ({}{})",
                d.address.clone().unwrap_or_default(),
                d.connection_type.clone().unwrap_or_default(),
                if d.block_lane { ", block lane" } else { "" }
            )
        } else {
            "offline".into()
        };
        println!(
            "  {:<12} {}  {}  in {} out {}",
            if d.name.is_empty() {
                "(unnamed)"
            } else {
                &d.name
            },
            d.id,
            conn,
            human_bytes(d.bytes_in),
            human_bytes(d.bytes_out)
        );
    }
    Ok(0)
}

pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1000.0 && i < U.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn parse_id(s: &str) -> anyhow::Result<DeviceId> {
    s.parse::<DeviceId>()
        .map_err(|e| anyhow!("{s:?} is not a valid device ID: {e}"))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn device(home: &Home, cmd: DeviceCmd) -> anyhow::Result<i32> {
    let c = client(home)?;
    match cmd {
        DeviceCmd::Add { id, name, addrs } => {
            let id = parse_id(&id)?;
            match &c {
                Some(c) => {
                    c.post::<serde_json::Value>(
                        "/rest/devices",
                        &json!({"id": id.to_string(), "name": name, "addresses": addrs}),
                    )?;
                }
                None => {
                    let own = load_identity(home)?.device_id();
                    edit_offline(home, |cfg| cfg.add_device(id, name, addrs, own))?;
                }
            }
            println!("Added device {id}.");
            println!(
                "It must add this device too: ferry device add {}",
                load_identity(home)?.device_id()
            );
        }
        DeviceCmd::List { json } => {
            let cfg = load_config(home)?;
            if json {
                print_json(&cfg.devices)?;
            } else {
                for d in &cfg.devices {
                    println!("{}  {}  {}", d.id, d.name, d.addresses.join(" "));
                }
            }
        }
        DeviceCmd::Remove { id } => {
            let id = parse_id(&id)?;
            match &c {
                Some(c) => {
                    c.delete::<serde_json::Value>(&format!("/rest/devices/{id}"))?;
                }
                None => edit_offline(home, |cfg| cfg.remove_device(&id))?,
            }
            println!("Removed device {id}.");
        }
        DeviceCmd::Pending { json } => {
            let cfg = load_config(home)?;
            if json {
                print_json(&cfg.pending_devices)?;
            } else if cfg.pending_devices.is_empty() {
                println!("No pending devices.");
            } else {
                for p in &cfg.pending_devices {
                    println!("{}  {}  {}  seen {}", p.id, p.name, p.address, p.seen);
                }
            }
        }
        DeviceCmd::Accept { id } => {
            let id = parse_id(&id)?;
            match &c {
                Some(c) => {
                    c.post::<serde_json::Value>(&format!("/rest/devices/{id}/accept"), &json!({}))?;
                }
                None => {
                    let own = load_identity(home)?.device_id();
                    edit_offline(home, |cfg| {
                        let p = cfg
                            .pending_devices
                            .iter()
                            .find(|p| p.id == id)
                            .cloned()
                            .ok_or_else(|| {
                                crate::Error::Invalid(format!("device {id} is not pending"))
                            })?;
                        let addrs = if p.address.is_empty() {
                            vec![]
                        } else {
                            vec![p.address]
                        };
                        cfg.add_device(id, Some(p.name), addrs, own)
                    })?;
                }
            }
            println!("Accepted device {id}.");
        }
        DeviceCmd::Ignore { id } => {
            let id = parse_id(&id)?;
            match &c {
                Some(c) => {
                    c.post::<serde_json::Value>(&format!("/rest/devices/{id}/ignore"), &json!({}))?;
                }
                None => edit_offline(home, |cfg| {
                    cfg.ignore_device(id);
                    Ok(())
                })?,
            }
            println!("Ignoring device {id}.");
        }
    }
    Ok(0)
}

fn abs(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn folder(home: &Home, cmd: FolderCmd) -> anyhow::Result<i32> {
    let c = client(home)?;
    match cmd {
        FolderCmd::Add {
            path,
            id,
            label,
            kind,
        } => {
            let kind: FolderType = kind.parse()?;
            let path = abs(&path)?;
            let id = match &c {
                Some(c) => {
                    let v: serde_json::Value = c.post(
                        "/rest/folders",
                        &json!({"path": path, "id": id, "label": label, "type": kind.as_str()}),
                    )?;
                    v["id"].as_str().unwrap_or_default().to_string()
                }
                None => edit_offline(home, |cfg| cfg.add_folder(&path, id, label, kind))?,
            };
            println!("Added folder {id} at {}.", path.display());
            println!("Share it with a paired device: ferry folder share {id} DEVICE_ID");
        }
        FolderCmd::Share { folder, device } => {
            let dev = parse_id(&device)?;
            match &c {
                Some(c) => {
                    c.post::<serde_json::Value>(
                        &format!("/rest/folders/{folder}/share"),
                        &json!({"device": dev.to_string()}),
                    )?;
                }
                None => edit_offline(home, |cfg| cfg.share_folder(&folder, dev))?,
            }
            println!("Folder {folder} is shared with {dev}.");
        }
        FolderCmd::Set {
            folder,
            label,
            kind,
            versioning,
            keep_days,
            ignore_delete,
            rescan_interval,
            paused,
        } => {
            let settings = crate::config::FolderSettings {
                label,
                kind: kind.map(|k| k.parse::<FolderType>()).transpose()?,
                versioning,
                keep_days,
                ignore_delete,
                rescan_interval_s: rescan_interval,
                paused,
            };
            match &c {
                Some(c) => {
                    c.patch::<serde_json::Value>(
                        &format!("/rest/folders/{folder}"),
                        &serde_json::to_value(&settings)?,
                    )?;
                }
                None => edit_offline(home, |cfg| cfg.set_folder(&folder, settings))?,
            }
            println!("Updated folder {folder}.");
        }
        FolderCmd::List { json } => {
            let cfg = load_config(home)?;
            if json {
                print_json(&cfg.folders)?;
            } else {
                for f in &cfg.folders {
                    println!(
                        "{}  {:?}  {}  {}  shared with {}",
                        f.id,
                        f.label,
                        f.path.display(),
                        f.kind.as_str(),
                        f.devices.len()
                    );
                }
            }
        }
        FolderCmd::Pending { json } => {
            let cfg = load_config(home)?;
            if json {
                print_json(&cfg.pending_folders)?;
            } else if cfg.pending_folders.is_empty() {
                println!("No pending folders.");
            } else {
                for p in &cfg.pending_folders {
                    println!(
                        "{}  {:?}  from {}  seen {}",
                        p.id, p.label, p.device, p.seen
                    );
                }
            }
        }
        FolderCmd::Accept { folder, path } => {
            let path = abs(&path)?;
            match &c {
                Some(c) => {
                    c.post::<serde_json::Value>(
                        &format!("/rest/folders/{folder}/accept"),
                        &json!({"path": path}),
                    )?;
                }
                None => edit_offline(home, |cfg| cfg.accept_folder(&folder, &path))?,
            }
            println!("Accepted folder {folder} at {}.", path.display());
        }
        FolderCmd::Ignore { folder } => {
            match &c {
                Some(c) => {
                    c.post::<serde_json::Value>(
                        &format!("/rest/folders/{folder}/ignore"),
                        &json!({}),
                    )?;
                }
                None => edit_offline(home, |cfg| {
                    cfg.ignore_folder(&folder);
                    Ok(())
                })?,
            }
            println!("Ignoring folder {folder}.");
        }
        FolderCmd::Revert { folder } => {
            let c = c.ok_or_else(|| {
                anyhow!("reverting needs the running daemon; start it with `ferry run`")
            })?;
            let v: serde_json::Value =
                c.post(&format!("/rest/folders/{folder}/revert"), &json!({}))?;
            println!(
                "Reverted {} local changes in {folder}.",
                v["reverted"].as_u64().unwrap_or(0)
            );
        }
        FolderCmd::Remove { folder } => {
            match &c {
                Some(c) => {
                    c.delete::<serde_json::Value>(&format!("/rest/folders/{folder}"))?;
                }
                None => edit_offline(home, |cfg| cfg.remove_folder(&folder))?,
            }
            println!("Stopped syncing folder {folder} (its files stay on disk).");
        }
    }
    Ok(0)
}

fn pause(home: &Home, paused: bool) -> anyhow::Result<i32> {
    match client(home)? {
        Some(c) => {
            c.post::<serde_json::Value>(
                if paused {
                    "/rest/pause"
                } else {
                    "/rest/resume"
                },
                &json!({}),
            )?;
        }
        None => edit_offline(home, |cfg| {
            cfg.paused = paused;
            Ok(())
        })?,
    }
    println!("{}", if paused { "Paused." } else { "Resumed." });
    Ok(0)
}

fn invite(home: &Home, folder: Option<String>) -> anyhow::Result<i32> {
    let c = need_daemon(home).context("an invite is answered by the running daemon")?;
    let v: serde_json::Value = c.post("/rest/invite", &json!({"folder": folder}))?;
    let inv = v["invite"].as_str().unwrap_or_default();
    println!("{inv}");
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // Upper-case base32 fits the QR alphanumeric mode, so the code stays small.
        if let Ok(code) = qrcode::QrCode::with_error_correction_level(inv, qrcode::EcLevel::L) {
            let art = code
                .render::<qrcode::render::unicode::Dense1x2>()
                .dark_color(qrcode::render::unicode::Dense1x2::Light)
                .light_color(qrcode::render::unicode::Dense1x2::Dark)
                .build();
            eprintln!("\n{art}");
        }
    }
    eprintln!(
        "\nOn the other device run:\n  ferry join {inv}\nThe invite works once, for {} minutes.",
        v["expires_in_s"].as_u64().unwrap_or(0) / 60
    );
    Ok(0)
}

fn join(home: &Home, invite: &str, path: Option<PathBuf>) -> anyhow::Result<i32> {
    // Catch a damaged invite before anything else.
    crate::invite::Invite::decode(invite)?;
    let path = path.map(|p| abs(&p)).transpose()?;
    if !home.is_initialised() {
        daemon::load_or_init(home)?;
    }
    let msg = match client(home)? {
        Some(c) => {
            let v: serde_json::Value =
                c.post("/rest/join", &json!({"invite": invite, "path": path}))?;
            v["message"].as_str().unwrap_or_default().to_string()
        }
        None => {
            // No daemon: run the engine just long enough to pair.
            let rt = tokio::runtime::Runtime::new()?;
            let home = home.clone();
            let invite = invite.to_string();
            rt.block_on(async move {
                let h = daemon::start(home, RunOptions { no_mdns: true }).await?;
                let r = h.join(&invite, path).await;
                h.stop().await;
                r
            })?
        }
    };
    println!("{msg}");
    Ok(0)
}

/// Runs a circuit-relay node until Ctrl-C. Devices use it by adding
/// `<relay address>/p2p/<relay peer id>/p2p-circuit` to their listen addresses.
fn relay(home: &Home, listen: Vec<String>) -> anyhow::Result<i32> {
    init_tracing();
    let id = Identity::load_or_create(&home.identity_path())?;
    let listen = if listen.is_empty() {
        vec!["/ip4/0.0.0.0/tcp/22067".to_string()]
    } else {
        listen
    };
    let addrs = listen
        .iter()
        .map(|l| {
            l.parse::<libp2p::Multiaddr>()
                .map_err(|e| anyhow!("--listen {l:?} is not a multiaddr: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let relay = crate::net::start_relay(id.libp2p_keypair(), addrs).await?;
        let peer = relay.peer_id();
        for a in relay.listen_addrs() {
            println!("relay listening on {a}/p2p/{peer}");
        }
        println!("devices behind NAT add to their listen addresses: <address above>/p2p-circuit");
        let _ = tokio::signal::ctrl_c().await;
        relay.shutdown().await;
        anyhow::Ok(())
    })?;
    Ok(0)
}

fn scan(home: &Home, folder: Option<String>) -> anyhow::Result<i32> {
    match client(home)? {
        Some(c) => {
            c.post::<serde_json::Value>("/rest/scan", &json!({"folder": folder}))?;
            println!("Scan done.");
            Ok(0)
        }
        None => scan_offline(home, folder),
    }
}

/// Scans without a daemon, with a progress bar: the first indexing of a big folder.
fn scan_offline(home: &Home, folder: Option<String>) -> anyhow::Result<i32> {
    use indicatif::{ProgressBar, ProgressStyle};
    let cfg = load_config(home)?;
    let own = load_identity(home)?.device_id();
    let folders: Vec<_> = match &folder {
        Some(id) => vec![cfg
            .folder(id)
            .cloned()
            .ok_or_else(|| anyhow!("no folder with id {id:?}"))?],
        None => cfg.folders.clone(),
    };
    std::fs::create_dir_all(&home.data_dir)?;
    let index = crate::index::Index::open(&home.index_path())?;
    for f in folders {
        if !f.path.join(crate::config::MARKER_DIR).is_dir() {
            bail!(
                "folder {}: marker {} is missing (disk unmounted?); not scanning",
                f.id,
                f.path.join(crate::config::MARKER_DIR).display()
            );
        }
        futures::executor::block_on(index.ensure_folder(&f.id))?;
        let known = futures::executor::block_on(index.local_snapshot(&f.id, vec![]))?;
        let ignores = crate::ignore::Ignores::load(&f.path)?;
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(f.id.clone());
        let started = std::time::Instant::now();
        let progress = |p: crate::scanner::ScanProgress| {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "{}/{} files, {:.0} files/s",
                p.files_done,
                p.files_total,
                p.files_done as f64 / secs
            ));
        };
        let req = crate::scanner::ScanRequest {
            root: &f.path,
            subpaths: vec![],
            known: &known,
            ignores: &ignores,
            progress: Some(&progress),
        };
        let id = f.id.clone();
        let stats = crate::scanner::scan(&req, &mut |changes| {
            futures::executor::block_on(index.commit_local_changes(&id, own.short(), changes))?;
            Ok(())
        })?;
        bar.finish_and_clear();
        println!(
            "{}: {} files, {} dirs, {} ({} hashed) in {:.1}s; {} changed, {} deleted",
            f.id,
            stats.files,
            stats.dirs,
            human_bytes(stats.bytes),
            human_bytes(stats.hashed_bytes),
            started.elapsed().as_secs_f64(),
            stats.changed,
            stats.deleted
        );
    }
    futures::executor::block_on(index.close())?;
    Ok(0)
}
