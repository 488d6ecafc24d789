//! What the tray shows, as pure functions: a status snapshot in, the icon state, the
//! tooltip and the menu out; and the icons themselves, drawn in code.
//!
//! This module has no GUI and no I/O (except [`write_icons`], which saves the PNGs that
//! `packaging/icons/` holds), so it is compiled and unit-tested in every build. The GUI
//! in `tray` (cargo feature `tray`) only turns a [`TrayView`] into a `tray-icon` icon and
//! `muda` menu, and turns a clicked menu entry back into an [`Action`].
//!
//! Which state wins when several apply, most urgent first:
//!
//! 1. **Offline** with "Ferry is not running" when no daemon answers;
//! 2. **Error** when a folder has errors or something waits for the person (a device that
//!    wants to connect, a folder offered by a paired device);
//! 3. **Paused** when the person paused syncing;
//! 4. **Syncing** while a folder scans or pulls (percent and bytes left over all folders);
//! 5. **Offline** when no paired device is connected (or none is paired yet);
//! 6. **Up to date** otherwise.

use std::path::{Path, PathBuf};

use crate::config::{PendingDevice, PendingFolder};
use crate::daemon::{FolderStatus, Status};

/// The icon to show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrayState {
    UpToDate,
    /// `percent` is over every folder that needs data, never 100 while bytes are left.
    Syncing {
        percent: u8,
        bytes_left: u64,
    },
    Paused,
    Error,
    Offline,
}

impl TrayState {
    pub fn icon(self) -> IconKind {
        match self {
            TrayState::UpToDate => IconKind::UpToDate,
            TrayState::Syncing { .. } => IconKind::Syncing,
            TrayState::Paused => IconKind::Paused,
            TrayState::Error => IconKind::Error,
            TrayState::Offline => IconKind::Offline,
        }
    }
}

/// What a menu entry does when clicked. The tray carries it out through the control API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    CopyDeviceId(String),
    OpenFolder(String),
    Scan(String),
    AcceptDevice(String),
    IgnoreDevice(String),
    /// Accept into `~/Ferry/<dir_name>` (see [`accept_dir_name`]).
    AcceptFolder {
        id: String,
        label: String,
    },
    IgnoreFolder(String),
    Invite,
    /// Run the engine inside the tray (offered when no daemon answers).
    StartEngine,
    PauseAll,
    ResumeAll,
    ToggleAutostart,
    Quit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MenuEntry {
    /// A line of text that does nothing when clicked.
    Label(String),
    Separator,
    Item {
        label: String,
        action: Action,
    },
    Check {
        label: String,
        checked: bool,
        action: Action,
    },
    Submenu {
        label: String,
        entries: Vec<MenuEntry>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrayView {
    pub state: TrayState,
    /// The state in words. Also the first line of the menu, because Linux trays
    /// (AppIndicator) show no tooltips.
    pub tooltip: String,
    pub menu: Vec<MenuEntry>,
}

/// Everything the tray knows at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// `None` when no daemon answers on the control API.
    pub status: Option<&'a Status>,
    pub pending_devices: &'a [PendingDevice],
    pub pending_folders: &'a [PendingFolder],
    /// Whether "start at login" is set up.
    pub autostart: bool,
    /// The engine runs inside the tray process, so Quit stops syncing.
    pub in_process: bool,
}

/// `ferry tray` in a build without the `tray` feature.
pub fn tray_not_built() -> anyhow::Result<i32> {
    eprintln!(
        "this ferry was built without the tray icon; rebuild with `cargo build --release --features tray` \
         (on Debian it needs libgtk-3-dev, libxdo-dev and libayatana-appindicator3-dev), \
         or run the engine headless with `ferry run`"
    );
    Ok(2)
}

/// The directory under `~/Ferry/` an offered folder is accepted into from the tray.
pub fn accept_dir_name(label: &str, id: &str) -> String {
    let name = if label.trim().is_empty() { id } else { label };
    name.chars()
        .map(|c| {
            if c == '/' || c == '\\' || c == '\0' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn folder_has_error(f: &FolderStatus) -> bool {
    f.state == "error" || f.error.is_some() || !f.pull_errors.is_empty()
}

fn folder_busy(f: &FolderStatus, st: &Status) -> bool {
    match f.state.as_str() {
        "syncing" | "scanning" => true,
        "paused" | "error" => false,
        // Needs data and a device that has the folder is connected: about to pull.
        _ => {
            f.need_bytes > 0
                && f.devices.iter().any(|fd| {
                    st.devices
                        .iter()
                        .any(|d| d.connected && d.id.eq_ignore_ascii_case(&fd.id))
                })
        }
    }
}

/// Percent done over the folders that need data: floor, and never 100 while bytes are left.
fn percent_done(global_bytes: u64, need_bytes: u64) -> u8 {
    if need_bytes == 0 {
        return 100;
    }
    if global_bytes == 0 {
        return 0;
    }
    let have = global_bytes.saturating_sub(need_bytes) as u128;
    let p = (have * 100 / global_bytes as u128) as u8;
    p.min(99)
}

/// "Syncing 42% · 1.2 GB left", or "Scanning…" when nothing is to be fetched.
pub fn syncing_words(percent: u8, bytes_left: u64) -> String {
    if bytes_left == 0 {
        "Scanning…".to_string()
    } else {
        format!(
            "Syncing {percent}% · {} left",
            crate::cli::human_bytes(bytes_left)
        )
    }
}

fn folder_words(f: &FolderStatus, st: &Status) -> String {
    if folder_has_error(f) {
        return "Error".into();
    }
    match f.state.as_str() {
        "paused" => "Paused".into(),
        "scanning" => "Scanning".into(),
        _ if f.need_bytes > 0 || f.need_files > 0 => {
            let p = percent_done(f.global_bytes, f.need_bytes);
            if folder_busy(f, st) {
                format!("Syncing {p}%")
            } else {
                format!("{p}%, waiting for a device")
            }
        }
        "syncing" => "Syncing".into(),
        _ => "Up to date".into(),
    }
}

/// The state, tooltip and menu for one snapshot.
pub fn tray_view(s: &Snapshot) -> TrayView {
    let Some(st) = s.status else {
        let tooltip = if s.in_process {
            "Ferry is starting…".to_string()
        } else {
            "Ferry is not running".to_string()
        };
        let mut menu = vec![MenuEntry::Label(tooltip.clone()), MenuEntry::Separator];
        if !s.in_process {
            menu.push(MenuEntry::Item {
                label: "Start Ferry".into(),
                action: Action::StartEngine,
            });
        }
        menu.extend([
            MenuEntry::Check {
                label: "Start at login".into(),
                checked: s.autostart,
                action: Action::ToggleAutostart,
            },
            MenuEntry::Separator,
            MenuEntry::Item {
                label: "Quit".into(),
                action: Action::Quit,
            },
        ]);
        return TrayView {
            state: TrayState::Offline,
            tooltip,
            menu,
        };
    };

    let failing = st.folders.iter().filter(|f| folder_has_error(f)).count();
    let connected = st.devices.iter().filter(|d| d.connected).count();
    let busy: Vec<&FolderStatus> = st.folders.iter().filter(|f| folder_busy(f, st)).collect();

    let (state, tooltip) =
        if failing > 0 || !s.pending_devices.is_empty() || !s.pending_folders.is_empty() {
            let mut parts = Vec::new();
            if failing > 0 {
                parts.push(format!(
                    "{} {}",
                    plural(failing, "folder", "folders"),
                    if failing == 1 {
                        "has errors"
                    } else {
                        "have errors"
                    }
                ));
            }
            let n = s.pending_devices.len();
            if n > 0 {
                parts.push(format!(
                    "{} {}",
                    plural(n, "device", "devices"),
                    if n == 1 {
                        "wants to connect"
                    } else {
                        "want to connect"
                    }
                ));
            }
            let n = s.pending_folders.len();
            if n > 0 {
                parts.push(format!(
                    "{} {}",
                    plural(n, "folder", "folders"),
                    if n == 1 { "is offered" } else { "are offered" }
                ));
            }
            (TrayState::Error, parts.join(" · "))
        } else if st.paused {
            (TrayState::Paused, "Paused".to_string())
        } else if !busy.is_empty() {
            let global: u64 = busy.iter().map(|f| f.global_bytes).sum();
            let need: u64 = busy.iter().map(|f| f.need_bytes).sum();
            let percent = percent_done(global, need);
            (
                TrayState::Syncing {
                    percent,
                    bytes_left: need,
                },
                syncing_words(percent, need),
            )
        } else if connected == 0 {
            let why = if st.devices.is_empty() {
                "Offline · no devices paired yet"
            } else {
                "Offline · no device connected"
            };
            (TrayState::Offline, why.to_string())
        } else {
            (
                TrayState::UpToDate,
                format!("Up to date · {}", plural(connected, "device", "devices")),
            )
        };

    TrayView {
        state,
        menu: menu(s, st, &tooltip),
        tooltip,
    }
}

fn short_id(id: &str) -> &str {
    id.get(..7).unwrap_or(id)
}

fn menu(s: &Snapshot, st: &Status, tooltip: &str) -> Vec<MenuEntry> {
    use MenuEntry::*;
    let mut m = vec![Label(tooltip.to_string()), Separator];

    let name = if st.name.is_empty() {
        "This device"
    } else {
        &st.name
    };
    m.push(Label(format!("{name} ({})", short_id(&st.device_id))));
    m.push(Item {
        label: "Copy device ID".into(),
        action: Action::CopyDeviceId(st.device_id.clone()),
    });

    m.push(Separator);
    if st.folders.is_empty() {
        m.push(Label("No folders yet".into()));
    } else {
        m.push(Label("Folders".into()));
    }
    for f in &st.folders {
        let title = if f.label.is_empty() { &f.id } else { &f.label };
        let mut sub = vec![Label(f.path.clone())];
        sub.push(Label(format!(
            "{}, {}",
            plural(f.local_files as usize, "file", "files"),
            crate::cli::human_bytes(f.local_bytes)
        )));
        if f.need_bytes > 0 || f.need_files > 0 {
            sub.push(Label(format!(
                "Needs {}, {}",
                plural(f.need_files as usize, "file", "files"),
                crate::cli::human_bytes(f.need_bytes)
            )));
        }
        if let Some(e) = &f.error {
            sub.push(Label(format!("Error: {e}")));
        }
        for e in f.pull_errors.iter().take(3) {
            sub.push(Label(format!("Cannot sync {}: {}", e.name, e.error)));
        }
        if f.pull_errors.len() > 3 {
            sub.push(Label(format!("…and {} more", f.pull_errors.len() - 3)));
        }
        sub.push(Separator);
        sub.push(Item {
            label: "Open folder".into(),
            action: Action::OpenFolder(f.path.clone()),
        });
        sub.push(Item {
            label: "Rescan".into(),
            action: Action::Scan(f.id.clone()),
        });
        m.push(Submenu {
            label: format!("{title} — {}", folder_words(f, st)),
            entries: sub,
        });
    }

    m.push(Separator);
    if st.devices.is_empty() {
        m.push(Label("No devices paired yet".into()));
    } else {
        m.push(Label("Devices".into()));
    }
    for d in &st.devices {
        let name = if d.name.is_empty() {
            short_id(&d.id)
        } else {
            &d.name
        };
        m.push(Label(if d.connected {
            format!("● {name} — connected")
        } else {
            format!("○ {name} — offline")
        }));
    }

    if !s.pending_devices.is_empty() || !s.pending_folders.is_empty() {
        m.push(Separator);
    }
    for p in s.pending_devices {
        let id = p.id.to_string();
        let who = if p.name.is_empty() {
            short_id(&id).to_string()
        } else {
            p.name.clone()
        };
        m.push(Submenu {
            label: format!("New device {who} wants to connect"),
            entries: vec![
                Label(id.clone()),
                Label(if p.address.is_empty() {
                    format!("seen {}", p.seen)
                } else {
                    format!("from {}", p.address)
                }),
                Separator,
                Item {
                    label: "Accept".into(),
                    action: Action::AcceptDevice(id.clone()),
                },
                Item {
                    label: "Ignore".into(),
                    action: Action::IgnoreDevice(id),
                },
            ],
        });
    }
    for p in s.pending_folders {
        let dev = p.device.to_string();
        let from = st
            .devices
            .iter()
            .find(|d| d.id.eq_ignore_ascii_case(&dev) && !d.name.is_empty())
            .map(|d| d.name.clone())
            .unwrap_or_else(|| short_id(&dev).to_string());
        let title = if p.label.is_empty() { &p.id } else { &p.label };
        m.push(Submenu {
            label: format!("Folder “{title}” offered by {from}"),
            entries: vec![
                Item {
                    label: format!("Accept into ~/Ferry/{}", accept_dir_name(&p.label, &p.id)),
                    action: Action::AcceptFolder {
                        id: p.id.clone(),
                        label: p.label.clone(),
                    },
                },
                Item {
                    label: "Ignore".into(),
                    action: Action::IgnoreFolder(p.id.clone()),
                },
            ],
        });
    }

    m.push(Separator);
    m.push(Item {
        label: "Invite a device…".into(),
        action: Action::Invite,
    });
    m.push(if st.paused {
        Item {
            label: "Resume all".into(),
            action: Action::ResumeAll,
        }
    } else {
        Item {
            label: "Pause all".into(),
            action: Action::PauseAll,
        }
    });
    m.push(Check {
        label: "Start at login".into(),
        checked: s.autostart,
        action: Action::ToggleAutostart,
    });
    m.push(Separator);
    m.push(Item {
        label: if s.in_process {
            "Quit (stops syncing)".into()
        } else {
            "Quit".into()
        },
        action: Action::Quit,
    });
    m
}

/// Whether two menus differ only in texts and check marks, so the tray can update the
/// items it shows in place instead of replacing the menu (which would close it).
pub fn same_shape(a: &[MenuEntry], b: &[MenuEntry]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (MenuEntry::Label(_), MenuEntry::Label(_)) => true,
            (MenuEntry::Separator, MenuEntry::Separator) => true,
            (MenuEntry::Item { action: p, .. }, MenuEntry::Item { action: q, .. }) => p == q,
            (MenuEntry::Check { action: p, .. }, MenuEntry::Check { action: q, .. }) => p == q,
            (MenuEntry::Submenu { entries: p, .. }, MenuEntry::Submenu { entries: q, .. }) => {
                same_shape(p, q)
            }
            _ => false,
        })
}

// ---------------------------------------------------------------------------------------
// Icons

/// One drawing per tray state, plus the application icon (launchers, packages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IconKind {
    App,
    UpToDate,
    Syncing,
    Paused,
    Error,
    Offline,
}

impl IconKind {
    pub const ALL: [IconKind; 6] = [
        IconKind::App,
        IconKind::UpToDate,
        IconKind::Syncing,
        IconKind::Paused,
        IconKind::Error,
        IconKind::Offline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            IconKind::App => "ferry",
            IconKind::UpToDate => "ferry-up-to-date",
            IconKind::Syncing => "ferry-syncing",
            IconKind::Paused => "ferry-paused",
            IconKind::Error => "ferry-error",
            IconKind::Offline => "ferry-offline",
        }
    }

    /// The disc's fill (sRGB). Each state has its own hue and its own glyph, so they
    /// differ for colour-blind people too; the glyph is white and the disc has a darker
    /// rim, so the icon reads on light and on dark panels.
    pub fn fill(self) -> [u8; 3] {
        match self {
            IconKind::App => [0x11, 0x8a, 0x8e],
            IconKind::UpToDate => [0x2d, 0x9d, 0x48],
            IconKind::Syncing => [0x25, 0x74, 0xe0],
            IconKind::Paused => [0xc9, 0x7c, 0x0c],
            IconKind::Error => [0xd3, 0x30, 0x2f],
            IconKind::Offline => [0x6e, 0x77, 0x81],
        }
    }
}

type P = (f32, f32);

fn seg_dist(p: P, a: P, b: P) -> f32 {
    let (abx, aby) = (b.0 - a.0, b.1 - a.1);
    let (apx, apy) = (p.0 - a.0, p.1 - a.1);
    let len2 = abx * abx + aby * aby;
    let t = if len2 == 0.0 {
        0.0
    } else {
        ((apx * abx + apy * aby) / len2).clamp(0.0, 1.0)
    };
    let (dx, dy) = (apx - t * abx, apy - t * aby);
    (dx * dx + dy * dy).sqrt()
}

fn capsule(p: P, a: P, b: P, r: f32) -> bool {
    seg_dist(p, a, b) <= r
}

fn triangle(p: P, a: P, b: P, c: P) -> bool {
    let side = |u: P, v: P| (v.0 - u.0) * (p.1 - u.1) - (v.1 - u.1) * (p.0 - u.0);
    let (d1, d2, d3) = (side(a, b), side(b, c), side(c, a));
    let neg = d1 < 0.0 || d2 < 0.0 || d3 < 0.0;
    let pos = d1 > 0.0 || d2 > 0.0 || d3 > 0.0;
    !(neg && pos)
}

/// Two arrows, one each way: the application's mark (and, greyed, "offline").
fn glyph_arrows(p: P) -> bool {
    let r = 0.058;
    capsule(p, (0.26, 0.37), (0.60, 0.37), r)
        || triangle(p, (0.79, 0.37), (0.57, 0.22), (0.57, 0.52))
        || capsule(p, (0.40, 0.63), (0.74, 0.63), r)
        || triangle(p, (0.21, 0.63), (0.43, 0.48), (0.43, 0.78))
}

fn glyph(kind: IconKind, p: P) -> bool {
    match kind {
        IconKind::App | IconKind::Offline => glyph_arrows(p),
        IconKind::UpToDate => {
            let r = 0.068;
            capsule(p, (0.28, 0.52), (0.44, 0.68), r) || capsule(p, (0.44, 0.68), (0.73, 0.36), r)
        }
        IconKind::Paused => {
            let bar = |x0: f32| p.0 >= x0 && p.0 <= x0 + 0.12 && p.1 >= 0.29 && p.1 <= 0.71;
            bar(0.32) || bar(0.56)
        }
        IconKind::Error => {
            capsule(p, (0.5, 0.27), (0.5, 0.54), 0.07)
                || ((p.0 - 0.5).powi(2) + (p.1 - 0.72).powi(2)).sqrt() <= 0.078
        }
        IconKind::Syncing => {
            // A circular arrow: an arc open at the upper right, with a head at its end.
            let (dx, dy) = (p.0 - 0.5, p.1 - 0.5);
            let radius = (dx * dx + dy * dy).sqrt();
            let mut angle = (-dy).atan2(dx).to_degrees();
            if angle < 0.0 {
                angle += 360.0;
            }
            let on_arc = (radius - 0.22).abs() <= 0.055 && !(20.0..=105.0).contains(&angle);
            // Head at 20°, pointing the way the arc turns (clockwise on screen).
            let (s, c) = 20f32.to_radians().sin_cos();
            let tip_base = (0.5 + 0.22 * c, 0.5 - 0.22 * s);
            let tangent = (-s, -c); // clockwise on screen, in (x right, y down)
            let normal = (c, -s);
            let w = 0.14;
            let head = triangle(
                p,
                (tip_base.0 + 0.16 * tangent.0, tip_base.1 + 0.16 * tangent.1),
                (tip_base.0 + w * normal.0, tip_base.1 + w * normal.1),
                (tip_base.0 - w * normal.0, tip_base.1 - w * normal.1),
            );
            on_arc || head
        }
    }
}

/// The icon as straight (not premultiplied) RGBA, `size`×`size`, 4×4 supersampled.
pub fn icon_rgba(kind: IconKind, size: u32) -> Vec<u8> {
    const SS: u32 = 4;
    let s = size as f32;
    let fill = kind.fill();
    let rim = fill.map(|c| (c as f32 * 0.62) as u8);
    // At least about one pixel of rim at the smallest sizes.
    let rim_w = (1.1 / s).max(0.045);
    let radius = 0.48;
    let mut out = Vec::with_capacity((size * size * 4) as usize);
    for y in 0..size {
        for x in 0..size {
            let mut acc = [0f32; 4]; // premultiplied
            for sy in 0..SS {
                for sx in 0..SS {
                    let p = (
                        (x as f32 + (sx as f32 + 0.5) / SS as f32) / s,
                        (y as f32 + (sy as f32 + 0.5) / SS as f32) / s,
                    );
                    let d = ((p.0 - 0.5).powi(2) + (p.1 - 0.5).powi(2)).sqrt();
                    let c = if d > radius {
                        continue;
                    } else if d > radius - rim_w {
                        rim
                    } else if glyph(kind, p) {
                        [255, 255, 255]
                    } else {
                        fill
                    };
                    acc[0] += c[0] as f32;
                    acc[1] += c[1] as f32;
                    acc[2] += c[2] as f32;
                    acc[3] += 1.0;
                }
            }
            if acc[3] == 0.0 {
                out.extend_from_slice(&[0, 0, 0, 0]);
            } else {
                let n = (SS * SS) as f32;
                out.push((acc[0] / acc[3]).round() as u8);
                out.push((acc[1] / acc[3]).round() as u8);
                out.push((acc[2] / acc[3]).round() as u8);
                out.push((acc[3] / n * 255.0).round() as u8);
            }
        }
    }
    out
}

fn crc32(bytes: &[&[u8]]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut c = 0xFFFF_FFFFu32;
    for part in bytes {
        for &b in *part {
            c = table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
        }
    }
    c ^ 0xFFFF_FFFF
}

/// Encodes RGBA as a PNG. Deflate "stored" blocks: no compression, no dependency, and the
/// same bytes every time (a test checks the committed files against the code).
pub fn png(rgba: &[u8], width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
    }
    let stride = width as usize * 4;
    let mut raw = Vec::with_capacity((stride + 1) * height as usize);
    for row in rgba.chunks(stride).take(height as usize) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = b.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The hicolor sizes the application icon is installed in.
pub const HICOLOR_SIZES: [u32; 6] = [16, 32, 48, 64, 128, 256];

/// Every icon file `packaging/icons/` holds, relative path and bytes: the application
/// icon in the hicolor layout, and each tray state at 32 px for the docs.
pub fn icon_files() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for s in HICOLOR_SIZES {
        files.push((
            Path::new("hicolor")
                .join(format!("{s}x{s}"))
                .join("apps")
                .join("ferry.png"),
            png(&icon_rgba(IconKind::App, s), s, s),
        ));
    }
    for k in IconKind::ALL.into_iter().filter(|k| *k != IconKind::App) {
        files.push((
            PathBuf::from("states").join(format!("{}.png", k.name())),
            png(&icon_rgba(k, 32), 32, 32),
        ));
    }
    files
}

/// Writes [`icon_files`] under `dir` (e.g. `packaging/icons`).
pub fn write_icons(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (rel, bytes) in icon_files() {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, bytes)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::{DeviceStatus, FolderDeviceStatus, PullError};
    use crate::types::DeviceId;

    fn laptop() -> DeviceId {
        DeviceId([7; 32])
    }

    fn folder(id: &str, state: &str, global: u64, need: u64) -> FolderStatus {
        FolderStatus {
            id: id.into(),
            label: id.to_uppercase(),
            path: format!("/home/me/{id}"),
            kind: "send-receive".into(),
            state: state.into(),
            error: None,
            local_files: 3,
            local_bytes: global - need,
            global_files: 3,
            global_bytes: global,
            need_files: u64::from(need > 0),
            need_bytes: need,
            completion: 100.0,
            devices: vec![FolderDeviceStatus {
                id: laptop().to_string(),
                completion: 100.0,
            }],
            local_changes: 0,
            pull_errors: vec![],
        }
    }

    fn device(name: &str, connected: bool) -> DeviceStatus {
        DeviceStatus {
            id: if name == "laptop" {
                laptop().to_string()
            } else {
                format!("{}-BBBBBB", name.to_uppercase())
            },
            name: name.into(),
            connected,
            address: None,
            bytes_in: 0,
            bytes_out: 0,
            connection_type: None,
            block_lane: false,
        }
    }

    fn status(folders: Vec<FolderStatus>, devices: Vec<DeviceStatus>) -> Status {
        Status {
            device_id: "MYDEVIC-EEEEEEE".into(),
            name: "desk".into(),
            listen: vec![],
            paused: false,
            folders,
            devices,
        }
    }

    fn view(st: &Status) -> TrayView {
        tray_view(&Snapshot {
            status: Some(st),
            pending_devices: &[],
            pending_folders: &[],
            autostart: false,
            in_process: false,
        })
    }

    fn labels(m: &[MenuEntry]) -> Vec<String> {
        let mut out = Vec::new();
        for e in m {
            match e {
                MenuEntry::Label(l) | MenuEntry::Item { label: l, .. } => out.push(l.clone()),
                MenuEntry::Check { label, checked, .. } => {
                    out.push(format!("[{}] {label}", if *checked { "x" } else { " " }))
                }
                MenuEntry::Submenu { label, entries } => {
                    out.push(format!("{label} >"));
                    out.extend(labels(entries).into_iter().map(|l| format!("  {l}")));
                }
                MenuEntry::Separator => out.push("--".into()),
            }
        }
        out
    }

    fn actions(m: &[MenuEntry]) -> Vec<Action> {
        let mut out = Vec::new();
        for e in m {
            match e {
                MenuEntry::Item { action, .. } | MenuEntry::Check { action, .. } => {
                    out.push(action.clone())
                }
                MenuEntry::Submenu { entries, .. } => out.extend(actions(entries)),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn up_to_date_counts_connected_devices() {
        let st = status(
            vec![folder("docs", "idle", 1000, 0)],
            vec![
                device("laptop", true),
                device("phone", true),
                device("nas", false),
            ],
        );
        let v = view(&st);
        assert_eq!(v.state, TrayState::UpToDate);
        assert_eq!(v.tooltip, "Up to date · 2 devices");
        assert_eq!(v.menu[0], MenuEntry::Label("Up to date · 2 devices".into()));

        let st = status(vec![], vec![device("laptop", true)]);
        assert_eq!(view(&st).tooltip, "Up to date · 1 device");
    }

    #[test]
    fn syncing_shows_percent_and_bytes_left_in_decimal_units() {
        // 42% of 2.069 GB done, 1.2 GB left.
        let st = status(
            vec![
                folder("docs", "syncing", 2_069_000_000, 1_200_000_000),
                folder("music", "idle", 5_000, 0),
            ],
            vec![device("laptop", true)],
        );
        let v = view(&st);
        assert_eq!(
            v.state,
            TrayState::Syncing {
                percent: 42,
                bytes_left: 1_200_000_000
            }
        );
        assert_eq!(v.tooltip, "Syncing 42% · 1.2 GB left");
        let l = labels(&v.menu);
        assert!(l.contains(&"DOCS — Syncing 42% >".to_string()), "{l:#?}");
        assert!(l.contains(&"MUSIC — Up to date >".to_string()), "{l:#?}");
    }

    #[test]
    fn syncing_never_says_100_percent_while_bytes_are_left() {
        let st = status(
            vec![folder("docs", "syncing", 10_000_000_000, 1)],
            vec![device("laptop", true)],
        );
        assert_eq!(view(&st).tooltip, "Syncing 99% · 1 B left");
        assert_eq!(syncing_words(0, 999), "Syncing 0% · 999 B left");
        assert_eq!(syncing_words(7, 12_345), "Syncing 7% · 12.3 kB left");
    }

    #[test]
    fn a_folder_that_needs_data_with_its_device_connected_counts_as_syncing() {
        let st = status(
            vec![folder("docs", "idle", 1_000_000, 250_000)],
            vec![device("laptop", true)],
        );
        assert_eq!(view(&st).tooltip, "Syncing 75% · 250.0 kB left");
    }

    #[test]
    fn scanning_without_anything_to_fetch() {
        let st = status(
            vec![folder("docs", "scanning", 1000, 0)],
            vec![device("laptop", false)],
        );
        let v = view(&st);
        assert_eq!(
            v.state,
            TrayState::Syncing {
                percent: 100,
                bytes_left: 0
            }
        );
        assert_eq!(v.tooltip, "Scanning…");
    }

    #[test]
    fn paused_wins_over_syncing_and_offers_resume() {
        let mut st = status(
            vec![folder("docs", "paused", 1000, 500)],
            vec![device("laptop", true)],
        );
        st.paused = true;
        let v = view(&st);
        assert_eq!(v.state, TrayState::Paused);
        assert_eq!(v.tooltip, "Paused");
        let a = actions(&v.menu);
        assert!(a.contains(&Action::ResumeAll) && !a.contains(&Action::PauseAll));
        assert!(labels(&v.menu).contains(&"DOCS — Paused >".to_string()));
        st.paused = false;
        assert!(actions(&view(&st).menu).contains(&Action::PauseAll));
    }

    #[test]
    fn folder_errors_are_counted() {
        let mut bad = folder("docs", "error", 1000, 0);
        bad.error = Some("marker .ferry is missing".into());
        let st = status(vec![bad.clone()], vec![device("laptop", true)]);
        let v = view(&st);
        assert_eq!(v.state, TrayState::Error);
        assert_eq!(v.tooltip, "1 folder has errors");
        assert!(labels(&v.menu).contains(&"  Error: marker .ferry is missing".to_string()));

        let mut unpullable = folder("music", "idle", 1000, 0);
        unpullable.pull_errors = vec![PullError {
            name: "a.mp3".into(),
            error: "no device has it".into(),
        }];
        let st = status(vec![bad, unpullable], vec![device("laptop", true)]);
        assert_eq!(view(&st).tooltip, "2 folders have errors");
    }

    #[test]
    fn pending_devices_and_folders_need_attention() {
        let st = status(vec![], vec![device("laptop", true)]);
        let laptop = laptop();
        let pd = vec![PendingDevice {
            id: laptop,
            name: "phone".into(),
            address: "/ip4/127.0.0.1/tcp/1".into(),
            seen: "2025-01-01T00:00:00Z".into(),
        }];
        let pf = vec![PendingFolder {
            id: "photos".into(),
            label: "Photos".into(),
            device: laptop,
            seen: "2025-01-01T00:00:00Z".into(),
        }];
        let snap = Snapshot {
            status: Some(&st),
            pending_devices: &pd,
            pending_folders: &[],
            autostart: false,
            in_process: false,
        };
        let v = tray_view(&snap);
        assert_eq!(v.state, TrayState::Error);
        assert_eq!(v.tooltip, "1 device wants to connect");
        let a = actions(&v.menu);
        assert!(a.contains(&Action::AcceptDevice(laptop.to_string())));
        assert!(a.contains(&Action::IgnoreDevice(laptop.to_string())));
        assert!(labels(&v.menu).contains(&"New device phone wants to connect >".to_string()));

        let v = tray_view(&Snapshot {
            pending_folders: &pf,
            ..snap
        });
        assert_eq!(v.tooltip, "1 device wants to connect · 1 folder is offered");
        assert!(actions(&v.menu).contains(&Action::AcceptFolder {
            id: "photos".into(),
            label: "Photos".into()
        }));
        assert!(labels(&v.menu).contains(&"  Accept into ~/Ferry/Photos".to_string()));

        let v = tray_view(&Snapshot {
            pending_devices: &[],
            pending_folders: &pf,
            ..snap
        });
        assert_eq!(v.tooltip, "1 folder is offered");
        // The offering device is named by its name when it is paired.
        assert!(
            labels(&v.menu).contains(&"Folder “Photos” offered by laptop >".to_string()),
            "{:#?}",
            labels(&v.menu)
        );
    }

    #[test]
    fn offline_when_no_device_is_connected_or_paired() {
        let st = status(
            vec![folder("docs", "idle", 1000, 400)],
            vec![device("laptop", false)],
        );
        let v = view(&st);
        assert_eq!(v.state, TrayState::Offline);
        assert_eq!(v.tooltip, "Offline · no device connected");
        assert!(labels(&v.menu).contains(&"○ laptop — offline".to_string()));
        assert!(labels(&v.menu).contains(&"DOCS — 60%, waiting for a device >".to_string()));

        let st = status(vec![], vec![]);
        let v = view(&st);
        assert_eq!(v.state, TrayState::Offline);
        assert_eq!(v.tooltip, "Offline · no devices paired yet");
    }

    #[test]
    fn no_daemon_means_offline_with_a_short_menu() {
        let v = tray_view(&Snapshot {
            status: None,
            pending_devices: &[],
            pending_folders: &[],
            autostart: true,
            in_process: false,
        });
        assert_eq!(v.state, TrayState::Offline);
        assert_eq!(v.tooltip, "Ferry is not running");
        assert_eq!(
            labels(&v.menu),
            [
                "Ferry is not running",
                "--",
                "Start Ferry",
                "[x] Start at login",
                "--",
                "Quit"
            ]
        );
    }

    #[test]
    fn the_full_menu() {
        let st = status(
            vec![folder("docs", "idle", 1000, 0)],
            vec![device("laptop", true)],
        );
        let v = tray_view(&Snapshot {
            status: Some(&st),
            pending_devices: &[],
            pending_folders: &[],
            autostart: false,
            in_process: true,
        });
        assert_eq!(
            labels(&v.menu),
            [
                "Up to date · 1 device",
                "--",
                "desk (MYDEVIC)",
                "Copy device ID",
                "--",
                "Folders",
                "DOCS — Up to date >",
                "  /home/me/docs",
                "  3 files, 1.0 kB",
                "  --",
                "  Open folder",
                "  Rescan",
                "--",
                "Devices",
                "● laptop — connected",
                "--",
                "Invite a device…",
                "Pause all",
                "[ ] Start at login",
                "--",
                "Quit (stops syncing)",
            ]
        );
        assert!(actions(&v.menu).contains(&Action::OpenFolder("/home/me/docs".into())));
        assert!(actions(&v.menu).contains(&Action::CopyDeviceId("MYDEVIC-EEEEEEE".into())));
    }

    #[test]
    fn progress_keeps_the_menu_shape_but_a_new_folder_does_not() {
        let a = view(&status(
            vec![folder("docs", "syncing", 1000, 600)],
            vec![device("laptop", true)],
        ));
        let b = view(&status(
            vec![folder("docs", "syncing", 1000, 300)],
            vec![device("laptop", true)],
        ));
        assert_ne!(a.menu, b.menu);
        assert!(same_shape(&a.menu, &b.menu));
        let c = view(&status(
            vec![
                folder("docs", "syncing", 1000, 300),
                folder("x", "idle", 1, 0),
            ],
            vec![device("laptop", true)],
        ));
        assert!(!same_shape(&b.menu, &c.menu));
    }

    #[test]
    fn accept_dir_names_are_plain_names() {
        assert_eq!(accept_dir_name("Photos", "p1"), "Photos");
        assert_eq!(accept_dir_name("", "p1"), "p1");
        assert_eq!(accept_dir_name("a/b", "p1"), "a_b");
    }

    fn pixel(rgba: &[u8], size: u32, x: u32, y: u32) -> [u8; 4] {
        let i = ((y * size + x) * 4) as usize;
        [rgba[i], rgba[i + 1], rgba[i + 2], rgba[i + 3]]
    }

    #[test]
    fn icons_have_a_transparent_corner_a_coloured_disc_and_a_white_glyph() {
        for kind in IconKind::ALL {
            for size in [16, 22, 32, 64] {
                let img = icon_rgba(kind, size);
                assert_eq!(img.len(), (size * size * 4) as usize);
                assert_eq!(pixel(&img, size, 0, 0)[3], 0, "{kind:?} corner");
                let f = kind.fill();
                let fill_px = img
                    .chunks(4)
                    .filter(|p| p[..3] == f[..] && p[3] == 255)
                    .count();
                let white = img
                    .chunks(4)
                    .filter(|p| p[0] > 240 && p[1] > 240 && p[2] > 240 && p[3] == 255)
                    .count();
                let area = (size * size) as usize;
                assert!(fill_px > area / 5, "{kind:?}@{size}: {fill_px} fill pixels");
                assert!(white > area / 40, "{kind:?}@{size}: {white} glyph pixels");
            }
        }
        // The states differ from each other in colour.
        let fills: std::collections::HashSet<[u8; 3]> =
            IconKind::ALL.iter().map(|k| k.fill()).collect();
        assert_eq!(fills.len(), IconKind::ALL.len());
    }

    #[test]
    fn png_encoding_is_well_formed() {
        let img = icon_rgba(IconKind::UpToDate, 16);
        let p = png(&img, 16, 16);
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&p[12..16], b"IHDR");
        assert_eq!(&p[p.len() - 8..p.len() - 4], b"IEND");
        // The well-known CRC of an empty IEND chunk.
        assert_eq!(&p[p.len() - 4..], &[0xAE, 0x42, 0x60, 0x82]);
        // Bigger than one stored block still works.
        let big = png(&icon_rgba(IconKind::App, 256), 256, 256);
        assert!(big.len() > 256 * 256 * 4);
    }

    /// `packaging/icons/` holds exactly what the code draws. After changing a drawing,
    /// regenerate with `FERRY_WRITE_ICONS=1 cargo test --lib tray_model`.
    #[test]
    fn packaged_icons_match_the_code() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/icons");
        if std::env::var_os("FERRY_WRITE_ICONS").is_some() {
            write_icons(&dir).expect("write icons");
        }
        for (rel, bytes) in icon_files() {
            let p = dir.join(&rel);
            let on_disk = std::fs::read(&p).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is missing or stale; run FERRY_WRITE_ICONS=1 cargo test --lib tray_model",
                p.display()
            );
        }
    }
}
