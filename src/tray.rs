//! `ferry tray`: the icon in the panel, its tooltip and its menu (cargo feature `tray`).
//!
//! Three threads, each owning its part:
//!
//! - the **GTK thread** (the main thread) owns the `tray-icon` icon and the `muda` menu.
//!   A 100 ms GLib timer takes new [`TrayView`]s from the worker and applies them — the
//!   icon only when the state changes, menu texts in place when the menu keeps its shape
//!   (so an open menu stays open), a new menu otherwise — and hands clicked entries to
//!   the worker. It also owns the clipboard.
//! - the **worker** owns the control API client and, when no daemon answered for this
//!   home at start-up (or the person chose "Start Ferry"), the engine running in this
//!   process. Every second, and soon after any event on `/rest/events`, it reads
//!   `/rest/status` and the pending devices and folders and computes the view with
//!   [`tray_model::tray_view`]. Clicked entries become API calls here, never on the GTK
//!   thread, so a slow daemon cannot freeze the panel.
//! - the **event follower** reads the server-sent events of `/rest/events` and only
//!   pokes the worker; it reconnects after a second when the stream ends.
//!
//! Quit (or SIGINT / SIGTERM) ends the GTK loop, removes the icon, and then stops the
//! worker, which stops an in-process engine in the daemon's own shutdown order.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::json;
use tracing::{info, warn};
use tray_icon::menu::{
    CheckMenuItem, IsMenuItem, Menu, MenuEvent, MenuId, MenuItem, PredefinedMenuItem, Submenu,
};
use tray_icon::{Icon, TrayIcon, TrayIconBuilder};

use crate::autostart;
use crate::client::{Client, DaemonInfo};
use crate::config::{Config, Home, PendingDevice, PendingFolder};
use crate::daemon::{self, RunOptions, Status};
use crate::tray_model::{self, Action, IconKind, MenuEntry, Snapshot, TrayView};

/// The pixel size the icons are drawn at; panels scale them to their height.
const ICON_PX: u32 = 32;
/// How often the worker reads the status when nothing happens.
const POLL: Duration = Duration::from_secs(1);
/// Soonest re-read after an event, so a burst of per-file events costs one read.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(250);
/// How long Quit waits for an in-process engine to stop.
const ENGINE_STOP_WAIT: Duration = Duration::from_secs(20);

/// Worker → GTK thread.
enum UiMsg {
    View(TrayView),
    /// Put this text on the clipboard.
    Copy(String),
    Quit,
}

/// GTK thread (and event follower) → worker.
enum Cmd {
    Do(Action),
    /// Something happened on the event stream: read the status soon.
    Poke,
    Quit,
}

/// `ferry tray` for `home`; `home_arg` is the `--home` given, if any (for the autostart
/// entry, which must start the tray with the same home).
pub fn run(home: Home, home_arg: Option<&Path>) -> anyhow::Result<i32> {
    crate::cli::init_tracing();
    gtk::init().map_err(|e| {
        anyhow!("cannot start the tray: {e} (no graphical session? set DISPLAY, or run `ferry run` headless)")
    })?;
    let home_arg = autostart::absolute_home(home_arg)?;

    let icon_dir = std::env::temp_dir().join(format!("ferry-tray-{}", std::process::id()));
    std::fs::create_dir_all(&icon_dir)
        .with_context(|| format!("creating {}", icon_dir.display()))?;
    let first = tray_model::tray_view(&Snapshot {
        status: None,
        pending_devices: &[],
        pending_folders: &[],
        autostart: autostart::Entry::current().is_ok_and(|e| e.is_enabled()),
        in_process: false,
    });
    let tray = TrayIconBuilder::new()
        .with_id("ferry")
        .with_temp_dir_path(&icon_dir)
        .with_icon(icon(first.state.icon())?)
        .with_tooltip(&first.tooltip)
        .build()
        .context("creating the tray icon")?;

    let (ui_tx, ui_rx) = mpsc::channel::<UiMsg>();
    let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
    let worker = {
        let cmd_tx = cmd_tx.clone();
        let home = home.clone();
        thread::Builder::new()
            .name("tray-worker".into())
            .spawn(move || Worker::new(home, home_arg, ui_tx, cmd_tx).run(cmd_rx))?
    };

    let ui = Rc::new(RefCell::new(Ui {
        tray,
        icon: first.state.icon(),
        shown: None,
        menu: None,
        cmd: cmd_tx.clone(),
        force_refresh: false,
    }));
    ui.borrow_mut().show(first);

    let ticker = {
        let ui = ui.clone();
        gtk::glib::timeout_add_local(Duration::from_millis(100), move || {
            ui.borrow_mut().tick(&ui_rx);
            gtk::glib::ControlFlow::Continue
        })
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        gtk::glib::unix_signal_add_local(sig, || {
            info!("signal received; quitting");
            gtk::main_quit();
            gtk::glib::ControlFlow::Break
        });
    }

    info!("tray running");
    gtk::main();

    // The icon goes first, so the person sees Quit take effect at once: drop the last
    // references to it and let GTK carry out the removal.
    ticker.remove();
    drop(ui);
    while gtk::events_pending() {
        gtk::main_iteration_do(false);
    }
    let _ = std::fs::remove_dir_all(&icon_dir);
    let _ = cmd_tx.send(Cmd::Quit);
    match worker.join() {
        Ok(()) => {}
        Err(_) => warn!("the tray worker panicked"),
    }
    info!("tray stopped");
    Ok(0)
}

fn icon(kind: IconKind) -> anyhow::Result<Icon> {
    Icon::from_rgba(tray_model::icon_rgba(kind, ICON_PX), ICON_PX, ICON_PX)
        .map_err(|e| anyhow!("tray icon: {e}"))
}

/// A menu entry as built, to update its text in place.
enum Built {
    Label(MenuItem),
    Separator,
    Item(MenuItem),
    Check(CheckMenuItem),
    Sub(Submenu, Vec<Built>),
}

struct ShownMenu {
    _menu: Menu,
    built: Vec<Built>,
    actions: HashMap<MenuId, Action>,
}

/// The GTK thread's state.
struct Ui {
    tray: TrayIcon,
    icon: IconKind,
    shown: Option<TrayView>,
    menu: Option<ShownMenu>,
    cmd: mpsc::Sender<Cmd>,
    /// A check item was clicked: GTK flipped it, so re-apply the model's value even if
    /// the view did not change (e.g. enabling start at login failed).
    force_refresh: bool,
}

impl Ui {
    fn tick(&mut self, rx: &mpsc::Receiver<UiMsg>) {
        let mut latest = None;
        while let Ok(msg) = rx.try_recv() {
            match msg {
                UiMsg::View(v) => latest = Some(v),
                UiMsg::Copy(text) => copy_to_clipboard(&text),
                UiMsg::Quit => gtk::main_quit(),
            }
        }
        if let Some(v) = latest {
            self.show(v);
        }
        while let Ok(ev) = MenuEvent::receiver().try_recv() {
            let action = self
                .menu
                .as_ref()
                .and_then(|m| m.actions.get(&ev.id).cloned());
            match action {
                Some(Action::Quit) => {
                    info!("quit from the menu");
                    gtk::main_quit();
                }
                Some(a) => {
                    if a == Action::ToggleAutostart {
                        self.force_refresh = true;
                    }
                    let _ = self.cmd.send(Cmd::Do(a));
                }
                None => {}
            }
        }
    }

    fn show(&mut self, v: TrayView) {
        if self.shown.as_ref() == Some(&v) && !self.force_refresh {
            return;
        }
        let kind = v.state.icon();
        if kind != self.icon {
            match icon(kind) {
                Ok(i) => {
                    if let Err(e) = self.tray.set_icon(Some(i)) {
                        warn!("tray: cannot set the icon: {e}");
                    }
                    self.icon = kind;
                }
                Err(e) => warn!("{e}"),
            }
        }
        if self.shown.as_ref().map(|s| &s.tooltip) != Some(&v.tooltip) {
            info!(state = ?v.state, "tray: {}", v.tooltip);
            let _ = self.tray.set_tooltip(Some(&v.tooltip));
        }
        let same = match (&self.shown, &self.menu) {
            (Some(s), Some(_)) => tray_model::same_shape(&s.menu, &v.menu),
            _ => false,
        };
        if same {
            if let Some(m) = &self.menu {
                update_in_place(&m.built, &v.menu);
            }
        } else {
            let mut actions = HashMap::new();
            let menu = Menu::new();
            let built = build(&v.menu, &|i| menu.append(i), &mut actions);
            self.tray.set_menu(Some(Box::new(menu.clone())));
            self.menu = Some(ShownMenu {
                _menu: menu,
                built,
                actions,
            });
        }
        self.force_refresh = false;
        self.shown = Some(v);
    }
}

fn build(
    entries: &[MenuEntry],
    append: &dyn Fn(&dyn IsMenuItem) -> tray_icon::menu::Result<()>,
    actions: &mut HashMap<MenuId, Action>,
) -> Vec<Built> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let (item, r): (Built, _) = match e {
            MenuEntry::Label(text) => {
                let i = MenuItem::new(text, false, None);
                let r = append(&i);
                (Built::Label(i), r)
            }
            MenuEntry::Separator => {
                let r = append(&PredefinedMenuItem::separator());
                (Built::Separator, r)
            }
            MenuEntry::Item { label, action } => {
                let i = MenuItem::new(label, true, None);
                actions.insert(i.id().clone(), action.clone());
                let r = append(&i);
                (Built::Item(i), r)
            }
            MenuEntry::Check {
                label,
                checked,
                action,
            } => {
                let i = CheckMenuItem::new(label, true, *checked, None);
                actions.insert(i.id().clone(), action.clone());
                let r = append(&i);
                (Built::Check(i), r)
            }
            MenuEntry::Submenu { label, entries } => {
                let s = Submenu::new(label, true);
                let children = build(entries, &|i| s.append(i), actions);
                let r = append(&s);
                (Built::Sub(s, children), r)
            }
        };
        if let Err(e) = r {
            warn!("tray: cannot add a menu entry: {e}");
        }
        out.push(item);
    }
    out
}

/// Same shape (see [`tray_model::same_shape`]): only texts and check marks change.
fn update_in_place(built: &[Built], entries: &[MenuEntry]) {
    for (b, e) in built.iter().zip(entries) {
        match (b, e) {
            (Built::Label(i), MenuEntry::Label(t))
            | (Built::Item(i), MenuEntry::Item { label: t, .. })
                if i.text() != *t =>
            {
                i.set_text(t);
            }
            (Built::Check(i), MenuEntry::Check { label, checked, .. }) => {
                if i.text() != *label {
                    i.set_text(label);
                }
                if i.is_checked() != *checked {
                    i.set_checked(*checked);
                }
            }
            (Built::Sub(s, children), MenuEntry::Submenu { label, entries }) => {
                if s.text() != *label {
                    s.set_text(label);
                }
                update_in_place(children, entries);
            }
            (Built::Separator, MenuEntry::Separator) => {}
            _ => {}
        }
    }
}

fn copy_to_clipboard(text: &str) {
    let cb = gtk::Clipboard::get(&gtk::gdk::SELECTION_CLIPBOARD);
    cb.set_text(text);
    // Hand it to a clipboard manager, if there is one, so it outlives the tray.
    cb.store();
}

/// A desktop notification, if `notify-send` is installed; the log gets it either way.
fn notify(summary: &str, body: &str) {
    info!("{summary}: {body}");
    spawn_detached(
        "notify-send",
        &["--app-name=Ferry", "--icon=ferry", summary, body],
    );
}

/// Starts a helper program and reaps it in the background (no zombies).
fn spawn_detached(program: &str, args: &[&str]) -> bool {
    match std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            thread::spawn(move || {
                let _ = child.wait();
            });
            true
        }
        Err(_) => false,
    }
}

fn open_path(path: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    if !spawn_detached(opener, &[path]) {
        notify(
            "Cannot open the folder",
            &format!("{opener} is not installed; the folder is {path}"),
        );
    }
}

/// The engine, when it runs inside the tray process.
struct Engine {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
}

impl Engine {
    fn start(home: Home) -> anyhow::Result<Engine> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let failed = Arc::new(std::sync::Mutex::new(None));
        let f = failed.clone();
        let thread = thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // The engine's threads only: the tray's own stays as it is.
                daemon::use_batch_scheduling();
                let res = match daemon::engine_runtime() {
                    Ok(rt) => rt
                        .block_on(daemon::run(home, RunOptions::default(), async {
                            let _ = stop_rx.await;
                        }))
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(anyhow::Error::from(e).context("starting the async runtime")),
                };
                if let Err(e) = res {
                    warn!("the engine stopped: {e}");
                    if let Ok(mut g) = f.lock() {
                        *g = Some(e.to_string());
                    }
                }
            })?;
        info!("no daemon answered for this home; the engine runs inside the tray");
        Ok(Engine {
            stop: Some(stop_tx),
            thread: Some(thread),
            failed,
        })
    }

    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|g| g.clone())
    }

    /// Stops the engine in the daemon's order and waits (bounded) for it.
    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let start = Instant::now();
            while !t.is_finished() && start.elapsed() < ENGINE_STOP_WAIT {
                thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
                info!("engine stopped");
            } else {
                warn!("the engine did not stop within {ENGINE_STOP_WAIT:?}; leaving anyway");
            }
        }
    }
}

/// The worker thread's state.
struct Worker {
    home: Home,
    home_arg: Option<PathBuf>,
    ui: mpsc::Sender<UiMsg>,
    cmd: mpsc::Sender<Cmd>,
    client: Option<Client>,
    engine: Option<Engine>,
    /// Tells the event follower to stop.
    stop_events: Arc<AtomicBool>,
    /// Pending devices and folders already notified about.
    announced: HashSet<String>,
    first_poll: bool,
}

impl Worker {
    fn new(
        home: Home,
        home_arg: Option<PathBuf>,
        ui: mpsc::Sender<UiMsg>,
        cmd: mpsc::Sender<Cmd>,
    ) -> Worker {
        Worker {
            home,
            home_arg,
            ui,
            cmd,
            client: None,
            engine: None,
            stop_events: Arc::new(AtomicBool::new(false)),
            announced: HashSet::new(),
            first_poll: true,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        self.client = self.connect();
        if self.client.is_none() {
            self.start_engine();
        }
        self.follow_events();

        let mut last_poll: Option<Instant> = None;
        let mut next_poll = Instant::now();
        loop {
            let wait = next_poll.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Cmd::Do(a)) => {
                    self.act(a);
                    next_poll = Instant::now();
                }
                Ok(Cmd::Poke) => {
                    let soonest = last_poll.map_or_else(Instant::now, |t| t + EVENT_DEBOUNCE);
                    next_poll = next_poll.min(soonest);
                }
                Ok(Cmd::Quit) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.poll();
                    last_poll = Some(Instant::now());
                    next_poll = Instant::now() + POLL;
                }
            }
        }
        self.stop_events.store(true, Ordering::Relaxed);
        if let Some(mut e) = self.engine.take() {
            e.stop();
        }
    }

    fn connect(&self) -> Option<Client> {
        let cfg = Config::load(&self.home.config_path()).ok()?;
        Client::connect(&self.home, &cfg)
    }

    fn start_engine(&mut self) {
        match Engine::start(self.home.clone()) {
            Ok(e) => {
                // Wait (bounded) for its control API, so the first view is a real one.
                let start = Instant::now();
                while e.running() && start.elapsed() < Duration::from_secs(30) {
                    if let Some(c) = self.connect() {
                        self.client = Some(c);
                        break;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                if let Some(why) = e.failure() {
                    notify("Ferry could not start", &why);
                }
                self.engine = Some(e);
            }
            Err(e) => notify("Ferry could not start", &format!("{e:#}")),
        }
    }

    /// Starts the thread that turns `/rest/events` into pokes.
    fn follow_events(&self) {
        let home = self.home.clone();
        let stop = self.stop_events.clone();
        let cmd = self.cmd.clone();
        let _ = thread::Builder::new()
            .name("tray-events".into())
            .spawn(move || follow_events(home, stop, cmd));
    }

    fn snapshot_parts(&mut self) -> Option<(Status, Vec<PendingDevice>, Vec<PendingFolder>)> {
        if self.client.is_none() {
            self.client = self.connect();
        }
        let c = self.client.as_ref()?;
        let got = (|| -> crate::Result<_> {
            Ok((
                c.get::<Status>("/rest/status")?,
                c.get::<Vec<PendingDevice>>("/rest/devices/pending")?,
                c.get::<Vec<PendingFolder>>("/rest/folders/pending")?,
            ))
        })();
        match got {
            Ok(parts) => Some(parts),
            Err(e) => {
                warn!("tray: cannot read the status: {e}");
                self.client = None;
                None
            }
        }
    }

    fn poll(&mut self) {
        let parts = self.snapshot_parts();
        let autostart = autostart::Entry::current().is_ok_and(|e| e.is_enabled());
        let in_process = self.engine.as_ref().is_some_and(|e| e.running());
        let view = match &parts {
            Some((st, pd, pf)) => {
                self.announce(pd, pf, st);
                tray_model::tray_view(&Snapshot {
                    status: Some(st),
                    pending_devices: pd,
                    pending_folders: pf,
                    autostart,
                    in_process,
                })
            }
            None => tray_model::tray_view(&Snapshot {
                status: None,
                pending_devices: &[],
                pending_folders: &[],
                autostart,
                in_process,
            }),
        };
        if parts.is_some() {
            self.first_poll = false;
        }
        let _ = self.ui.send(UiMsg::View(view));
    }

    /// A notification for each newly pending device or folder (not for the ones that
    /// were already waiting when the tray started: the icon says so).
    fn announce(&mut self, pd: &[PendingDevice], pf: &[PendingFolder], st: &Status) {
        for p in pd {
            let key = format!("device:{}", p.id);
            if self.announced.insert(key) && !self.first_poll {
                notify(
                    "A new device wants to connect",
                    &format!(
                        "{} ({}) — accept or ignore it in the Ferry menu",
                        if p.name.is_empty() {
                            "unnamed"
                        } else {
                            &p.name
                        },
                        p.id
                    ),
                );
            }
        }
        for p in pf {
            let key = format!("folder:{}:{}", p.id, p.device);
            if self.announced.insert(key) && !self.first_poll {
                let from = st
                    .devices
                    .iter()
                    .find(|d| d.id == p.device.to_string())
                    .map(|d| d.name.clone())
                    .unwrap_or_else(|| p.device.to_string());
                notify(
                    "A folder is offered",
                    &format!(
                        "{from} shares “{}” — accept or ignore it in the Ferry menu",
                        if p.label.is_empty() { &p.id } else { &p.label }
                    ),
                );
            }
        }
    }

    fn act(&mut self, a: Action) {
        info!(?a, "tray: menu");
        if let Err(e) = self.try_act(&a) {
            notify("Ferry", &format!("{e:#}"));
        }
    }

    fn try_act(&mut self, a: &Action) -> anyhow::Result<()> {
        match a {
            Action::CopyDeviceId(id) => {
                let _ = self.ui.send(UiMsg::Copy(id.clone()));
                notify("Device ID copied", id);
                return Ok(());
            }
            Action::OpenFolder(p) => {
                open_path(p);
                return Ok(());
            }
            Action::ToggleAutostart => {
                let entry = autostart::Entry::current()?;
                if entry.is_enabled() {
                    entry.disable()?;
                    notify("Ferry will no longer start at login", &entry.location());
                } else {
                    entry.enable(&autostart::current_exe()?, self.home_arg.as_deref())?;
                    notify("Ferry will start at login", &entry.location());
                }
                return Ok(());
            }
            Action::Quit => {
                let _ = self.ui.send(UiMsg::Quit);
                return Ok(());
            }
            Action::StartEngine => {
                // A daemon may have come up meanwhile (systemd, a terminal): use it.
                self.client = self.connect();
                let running = self.engine.as_ref().is_some_and(|e| e.running());
                if self.client.is_none() && !running {
                    self.start_engine();
                }
                return Ok(());
            }
            _ => {}
        }
        if self.client.is_none() {
            self.client = self.connect();
        }
        let c = self
            .client
            .as_ref()
            .ok_or_else(|| anyhow!("Ferry is not running for this home"))?;
        let empty = json!({});
        match a {
            Action::Scan(folder) => {
                // A scan of a big folder takes a while; the panel must not wait for it.
                let home = self.home.clone();
                let folder = folder.clone();
                thread::spawn(move || {
                    let c = Config::load(&home.config_path())
                        .ok()
                        .and_then(|cfg| Client::connect(&home, &cfg));
                    if let Some(c) = c {
                        if let Err(e) =
                            c.post::<serde_json::Value>("/rest/scan", &json!({ "folder": folder }))
                        {
                            notify("Rescan failed", &e.to_string());
                        }
                    }
                });
            }
            Action::AcceptDevice(id) => {
                c.post::<serde_json::Value>(&format!("/rest/devices/{id}/accept"), &empty)?;
            }
            Action::IgnoreDevice(id) => {
                c.post::<serde_json::Value>(&format!("/rest/devices/{id}/ignore"), &empty)?;
            }
            Action::AcceptFolder { id, label } => {
                let base = directories::UserDirs::new()
                    .map(|u| u.home_dir().to_path_buf())
                    .ok_or_else(|| anyhow!("cannot find your home directory"))?;
                let path = base
                    .join("Ferry")
                    .join(tray_model::accept_dir_name(label, id));
                c.post::<serde_json::Value>(
                    &format!("/rest/folders/{id}/accept"),
                    &json!({ "path": path }),
                )?;
                notify(
                    "Folder accepted",
                    &format!("It syncs to {}", path.display()),
                );
            }
            Action::IgnoreFolder(id) => {
                c.post::<serde_json::Value>(&format!("/rest/folders/{id}/ignore"), &empty)?;
            }
            Action::Invite => {
                let v: serde_json::Value = c.post("/rest/invite", &empty)?;
                let inv = v["invite"].as_str().unwrap_or_default().to_string();
                let minutes = v["expires_in_s"].as_u64().unwrap_or(0) / 60;
                let _ = self.ui.send(UiMsg::Copy(format!("ferry join {inv}")));
                notify(
                    "Invite copied",
                    &format!(
                        "Paste it in a terminal on the other device (ferry join …). It works once, for {minutes} minutes."
                    ),
                );
            }
            Action::PauseAll => {
                c.post::<serde_json::Value>("/rest/pause", &empty)?;
            }
            Action::ResumeAll => {
                c.post::<serde_json::Value>("/rest/resume", &empty)?;
            }
            Action::CopyDeviceId(_)
            | Action::OpenFolder(_)
            | Action::ToggleAutostart
            | Action::StartEngine
            | Action::Quit => {}
        }
        Ok(())
    }
}

/// Reads `/rest/events` and pokes the worker for every event, reconnecting after a second
/// when the stream ends (daemon restarted or not there yet), until `stop`.
fn follow_events(home: Home, stop: Arc<AtomicBool>, cmd: mpsc::Sender<Cmd>) {
    // Each line is one SSE field; ours are a few hundred bytes.
    const MAX_LINE: u64 = 256 * 1024;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(true)
        .timeout_connect(Some(Duration::from_secs(5)))
        // No timeout on the stream itself: the server sends a keep-alive comment every
        // 15 s, which also lets this loop notice `stop`; a stopped daemon closes it.
        .timeout_recv_body(None)
        .build()
        .into();
    while !stop.load(Ordering::Relaxed) {
        let target = Config::load(&home.config_path())
            .ok()
            .zip(DaemonInfo::read(&home.daemon_path()));
        if let Some((cfg, info)) = target {
            let resp = agent
                .get(format!("http://{}/rest/events", info.api))
                .header("X-API-Key", &cfg.api.key)
                .call();
            if let Ok(resp) = resp {
                let mut reader = BufReader::new(resp.into_body().into_reader());
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if line.starts_with(b"data:") && cmd.send(Cmd::Poke).is_err() {
                        return;
                    }
                }
            }
        }
        thread::sleep(Duration::from_secs(1));
    }
}
