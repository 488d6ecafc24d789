//! The desktop: start at login, and (with `--features tray`) the tray icon as a person
//! sees it, under Xvfb with `trayer` as the panel, checked on screenshots.
//!
//! The tray test needs `Xvfb`, `trayer` and ImageMagick's `import`/`convert` (Debian
//! packages xvfb, trayer, imagemagick; `packaging/ci-desktop.sh` installs them). Without
//! them it prints why and passes. With `xdotool` it also opens the menu with a click and
//! accepts a device from it, and with `xclip` checks "Copy device ID". Screenshots of each state are kept in
//! `target/tray-screenshots/`.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// `ferry [--home H] autostart ACTION` with a private XDG_CONFIG_HOME and HOME.
fn autostart(cfg: &Path, fake_home: &Path, home: Option<&Path>, action: &str) -> (i32, String) {
    let mut c = Command::new(bin());
    if let Some(h) = home {
        c.arg("--home").arg(h);
    }
    let out = c
        .args(["autostart", action])
        .env("XDG_CONFIG_HOME", cfg)
        .env("HOME", fake_home)
        .env_remove("FERRY_HOME")
        .output()
        .expect("run ferry autostart");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Splits a Desktop Entry `Exec=` value into arguments (enough for unquoted and simply
/// quoted arguments, which is what Ferry writes for ordinary paths).
fn exec_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ' ' if !quoted => {
                if !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        args.push(cur);
    }
    args
}

#[test]
fn autostart_enable_status_disable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("xdg-config");
    let fake_home = dir.path().join("person");
    let home = dir.path().join("ferry home");
    std::fs::create_dir_all(&fake_home).unwrap();
    let entry = cfg.join("autostart/ferry.desktop");

    let (code, out) = autostart(&cfg, &fake_home, Some(&home), "status");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Start at login: disabled"), "{out}");
    assert!(out.contains(&entry.display().to_string()), "{out}");

    let (code, out) = autostart(&cfg, &fake_home, Some(&home), "enable");
    assert_eq!(code, 0, "{out}");
    let text = std::fs::read_to_string(&entry).expect("the autostart entry exists");
    assert!(text.starts_with("[Desktop Entry]\n"), "{text}");
    assert!(text.contains("\nType=Application\n"), "{text}");
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("Exec="))
        .expect("an Exec= line");
    let args = exec_args(exec);
    let bin = std::fs::canonicalize(bin()).unwrap();
    assert_eq!(
        std::fs::canonicalize(&args[0]).ok(),
        Some(bin),
        "Exec= starts the ferry binary: {exec}"
    );
    // The home has a space: it is quoted, and comes back whole.
    assert_eq!(
        args[1..],
        ["--home", home.to_str().unwrap(), "tray"],
        "{exec}"
    );
    assert!(
        exec.contains("\"--home\"") || exec.contains(" --home "),
        "{exec}"
    );

    let (code, out) = autostart(&cfg, &fake_home, Some(&home), "status");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Start at login: enabled"), "{out}");

    let (code, out) = autostart(&cfg, &fake_home, Some(&home), "disable");
    assert_eq!(code, 0, "{out}");
    assert!(!entry.exists(), "the entry is gone after disable");
    let (_, out) = autostart(&cfg, &fake_home, Some(&home), "status");
    assert!(out.contains("Start at login: disabled"), "{out}");
    let (code, out) = autostart(&cfg, &fake_home, Some(&home), "disable");
    assert_eq!(code, 0, "disabling twice is fine: {out}");

    // Without --home the entry starts the tray on the default home.
    let (code, out) = autostart(&cfg, &fake_home, None, "enable");
    assert_eq!(code, 0, "{out}");
    let text = std::fs::read_to_string(&entry).unwrap();
    let exec = text.lines().find_map(|l| l.strip_prefix("Exec=")).unwrap();
    assert_eq!(exec_args(exec)[1..], ["tray"], "{exec}");
    // A relative XDG_CONFIG_HOME is ignored (XDG spec): ~/.config is used instead.
    let (_, out) = autostart(Path::new("relative"), &fake_home, None, "status");
    assert!(
        out.contains(
            &fake_home
                .join(".config/autostart/ferry.desktop")
                .display()
                .to_string()
        ),
        "{out}"
    );
}

#[test]
fn autostart_rejects_unknown_actions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, out) = autostart(dir.path(), dir.path(), None, "sometimes");
    assert_ne!(code, 0, "{out}");
    assert!(!dir.path().join("autostart").exists());
}

#[cfg(not(feature = "tray"))]
#[test]
fn tray_without_the_feature_says_how_to_get_it() {
    let out = Command::new(bin())
        .args(["tray"])
        .env_remove("FERRY_HOME")
        .output()
        .expect("run ferry tray");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features tray"), "{err}");
}

/// The tray under a real X server and a real tray host.
#[cfg(feature = "tray")]
mod tray {
    use super::*;
    use ferry::tray_model::IconKind;
    use std::path::PathBuf;
    use std::process::{Child, Stdio};
    use std::time::Duration;

    const W: u32 = 400;
    /// Tall enough for the open menu below the 32 px panel.
    const H: u32 = 420;

    fn have(tool: &str) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A child process stopped (and reaped) when dropped: SIGTERM first, so Xvfb removes
    /// its /tmp/.X*-lock, then SIGKILL if it lingers.
    struct Proc(Child);

    impl Drop for Proc {
        fn drop(&mut self) {
            unsafe {
                libc::kill(self.0.id() as i32, libc::SIGTERM);
            }
            for _ in 0..40 {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn screenshots_dir() -> PathBuf {
        // tests run with the package root as the working directory
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tray-screenshots");
        std::fs::create_dir_all(&d).expect("mkdir target/tray-screenshots");
        d
    }

    /// Fields drop in order: the panel before the X server.
    struct Desktop {
        display: String,
        trayer: Option<Proc>,
        _xvfb: Proc,
    }

    impl Desktop {
        /// Xvfb on a free display number and trayer along its top edge.
        fn start() -> Desktop {
            let base = 60 + (std::process::id() % 200);
            let n = (base..base + 200)
                .find(|n| {
                    !Path::new(&format!("/tmp/.X{n}-lock")).exists()
                        && !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                })
                .expect("a free X display number");
            let display = format!(":{n}");
            let xvfb = Command::new("Xvfb")
                .args([
                    &display,
                    "-screen",
                    "0",
                    &format!("{W}x{H}x24"),
                    "-nolisten",
                    "tcp",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start Xvfb");
            let xvfb = Proc(xvfb);
            wait_for(
                "Xvfb to accept connections",
                Duration::from_secs(20),
                || {
                    Path::new(&format!("/tmp/.X11-unix/X{n}"))
                        .exists()
                        .then_some(())
                },
            );
            let mut d = Desktop {
                display,
                trayer: None,
                _xvfb: xvfb,
            };
            d.panel(0xeeeeee);
            d
        }

        /// (Re)starts the panel with a solid background colour.
        fn panel(&mut self, rgb: u32) {
            self.trayer = None;
            let t = Command::new("trayer")
                .args([
                    "--edge",
                    "top",
                    "--align",
                    "left",
                    "--widthtype",
                    "pixel",
                    "--width",
                    &W.to_string(),
                    "--heighttype",
                    "pixel",
                    "--height",
                    "32",
                    "--transparent",
                    "true",
                    "--alpha",
                    "0",
                    "--tint",
                    &format!("0x{rgb:06x}"),
                    "--SetDockType",
                    "true",
                ])
                .env("DISPLAY", &self.display)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start trayer");
            self.trayer = Some(Proc(t));
            std::thread::sleep(Duration::from_millis(700));
        }

        /// A screenshot of the whole screen: (PNG path, raw RGB bytes).
        fn shot(&self, name: &str) -> (PathBuf, Vec<u8>) {
            let png = screenshots_dir().join(format!("{name}.png"));
            let ok = Command::new("import")
                .args(["-display", &self.display, "-window", "root"])
                .arg(&png)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "import could not take a screenshot of {}", self.display);
            let raw = Command::new("convert")
                .arg(&png)
                .args(["-depth", "8", "rgb:-"])
                .output()
                .expect("convert the screenshot to raw RGB");
            assert_eq!(
                raw.stdout.len(),
                (W * H * 3) as usize,
                "screenshot size ({})",
                String::from_utf8_lossy(&raw.stderr)
            );
            (png, raw.stdout)
        }

        /// Pixels of the screenshot that have the icon's disc colour.
        fn count(rgb: &[u8], kind: IconKind) -> usize {
            let f = kind.fill();
            rgb.chunks(3)
                .filter(|p| (0..3).all(|i| (p[i] as i32 - f[i] as i32).abs() <= 12))
                .count()
        }

        /// Waits until the screen shows `kind`'s icon (and no other state's), saves the
        /// screenshot as `name`, and returns how many icon pixels it found.
        fn expect_icon(&self, kind: IconKind, name: &str, tray: &TrayProc) -> usize {
            let mut last = 0;
            for _ in 0..100 {
                let (png, rgb) = self.shot(name);
                let n = Self::count(&rgb, kind);
                let others: Vec<(IconKind, usize)> = IconKind::ALL
                    .into_iter()
                    .filter(|k| *k != kind && *k != IconKind::App)
                    .map(|k| (k, Self::count(&rgb, k)))
                    .filter(|(_, c)| *c > 20)
                    .collect();
                if n >= 60 && others.is_empty() {
                    eprintln!("{name}: {n} icon pixels in {}", png.display());
                    return n;
                }
                last = n;
                std::thread::sleep(Duration::from_millis(200));
            }
            panic!(
                "the {kind:?} icon did not appear ({last} matching pixels; see {}/{name}.png)\ntray log:\n{}",
                screenshots_dir().display(),
                tray.log()
            );
        }
    }

    impl Desktop {
        /// Clicks the icon (the panel's first slot), checks that a menu opened below the
        /// panel, saves the screenshot as `name` and closes the menu again.
        fn open_menu(&self, name: &str, tray: &TrayProc, close: bool) {
            let xdo = |args: &[&str]| self.xdotool(args);
            // Light pixels below the panel: the menu (the root window is black).
            let menu_pixels = |rgb: &[u8]| {
                rgb.chunks(3)
                    .skip((W * 40) as usize)
                    .filter(|p| p.iter().all(|c| *c > 200))
                    .count()
            };
            for _ in 0..5 {
                assert!(
                    xdo(&["mousemove", "16", "16", "click", "1"]),
                    "xdotool click"
                );
                for _ in 0..15 {
                    std::thread::sleep(Duration::from_millis(200));
                    let (png, rgb) = self.shot(name);
                    if menu_pixels(&rgb) > 5000 {
                        eprintln!("{name}: the menu is open in {}", png.display());
                        if close {
                            xdo(&["key", "Escape"]);
                            std::thread::sleep(Duration::from_millis(300));
                        }
                        return;
                    }
                }
            }
            panic!("no menu opened on a click on the icon\n{}", tray.log());
        }
    }

    impl Desktop {
        fn xdotool(&self, args: &[&str]) -> bool {
            Command::new("xdotool")
                .args(args)
                .env("DISPLAY", &self.display)
                .status()
                .is_ok_and(|s| s.success())
        }

        /// Key presses, a moment apart (GTK menus open submenus with a delay).
        fn keys(&self, keys: &[&str]) {
            for k in keys {
                assert!(self.xdotool(&["key", k]), "xdotool key {k}");
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }

    struct TrayProc {
        child: Option<Child>,
        log: PathBuf,
    }

    impl TrayProc {
        fn start(desk: &Desktop, home: &Path, log: PathBuf) -> TrayProc {
            let child = Command::new(bin())
                .arg("--home")
                .arg(home)
                .arg("tray")
                .env("DISPLAY", &desk.display)
                .env("FERRY_LOG", "info,ferry=debug,libp2p=warn")
                // No session bus: the AppIndicator falls back to an XEmbed tray icon,
                // which trayer hosts, and no stray D-Bus daemon outlives the test.
                .env("DBUS_SESSION_BUS_ADDRESS", "disabled:")
                .env("XDG_CONFIG_HOME", home.join("xdg-config"))
                .env_remove("FERRY_HOME")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("tray log"))
                .spawn()
                .expect("start ferry tray");
            TrayProc {
                child: Some(child),
                log,
            }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        fn wait_log(&self, what: &str) {
            wait_for(
                &format!("the tray to say {what:?}"),
                Duration::from_secs(30),
                || self.log().contains(what).then_some(()),
            );
        }

        /// SIGTERM, then the exit code (bounded wait).
        fn stop(&mut self) -> Option<i32> {
            let mut c = self.child.take()?;
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let code = wait_for("the tray to exit", Duration::from_secs(30), || {
                c.try_wait().ok().flatten()
            });
            code.code()
        }
    }

    impl Drop for TrayProc {
        fn drop(&mut self) {
            if let Some(mut c) = self.child.take() {
                if std::thread::panicking() {
                    eprintln!("---- tray log ----\n{}", self.log());
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    #[test]
    fn tray_icon_shows_each_state_on_a_real_panel() {
        let missing: Vec<&str> = ["Xvfb", "trayer", "import", "convert"]
            .into_iter()
            .filter(|t| !have(t))
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIPPED tray_icon_shows_each_state_on_a_real_panel: {} not installed \
                 (Debian: apt-get install xvfb trayer imagemagick)",
                missing.join(", ")
            );
            return;
        }
        let mut desk = Desktop::start();

        // A daemon runs for A: the tray is its client.
        let mut a = Node::new("alpha");
        a.start();
        let mut tray = TrayProc::start(&desk, &a.home, a.dir.path().join("tray.log"));
        tray.wait_log("tray: Offline · no devices paired yet");
        desk.expect_icon(IconKind::Offline, "1-offline-light-panel", &tray);

        a.ok(&["pause"]);
        tray.wait_log("tray: Paused");
        desk.expect_icon(IconKind::Paused, "2-paused", &tray);
        a.ok(&["resume"]);

        // An unknown device knocks: the icon asks for attention.
        let mut b = Node::new("bravo");
        b.ok(&[
            "device",
            "add",
            &a.id(),
            "--name",
            "alpha",
            "--addr",
            &a.addr(),
        ]);
        b.start();
        tray.wait_log("tray: 1 device wants to connect");
        desk.expect_icon(IconKind::Error, "3-error-device-wants-to-connect", &tray);

        // Accepted from the tray's menu (keyboard: the labels are skipped, so the second
        // item is the device's submenu and its first item is Accept), or with the CLI.
        if have("xdotool") {
            desk.open_menu("3b-menu-device-wants-to-connect", &tray, false);
            desk.keys(&["Down", "Down", "Right"]);
            std::thread::sleep(Duration::from_millis(500));
            desk.shot("3c-menu-accept-device");
            desk.keys(&["Return"]);
        } else {
            a.ok(&["device", "accept", &b.id()]);
        }
        // Connected, nothing to sync.
        tray.wait_log("tray: Up to date · 1 device");
        if have("xdotool") {
            assert!(
                tray.log().contains("AcceptDevice"),
                "accepted from the menu"
            );
        }
        desk.expect_icon(IconKind::UpToDate, "4-up-to-date", &tray);

        // The menu, as a person opens it: a click on the icon.
        if have("xdotool") {
            desk.open_menu("4b-menu-up-to-date", &tray, !have("xclip"));
            if have("xclip") {
                // "Copy device ID" is the first item that can be chosen.
                desk.keys(&["Down", "Return"]);
                let id = a.id();
                wait_for(
                    "the device ID on the clipboard",
                    Duration::from_secs(10),
                    || {
                        let out = Command::new("xclip")
                            .args(["-o", "-selection", "clipboard"])
                            .env("DISPLAY", &desk.display)
                            .output()
                            .ok()?;
                        (String::from_utf8_lossy(&out.stdout) == id).then_some(())
                    },
                );
            }
        }

        // The same on a dark panel (the icon moves to the new tray host by itself).
        desk.panel(0x202124);
        desk.expect_icon(IconKind::UpToDate, "5-up-to-date-dark-panel", &tray);

        assert_eq!(tray.stop(), Some(0), "tray exit code\n{}", tray.log());
        let (png, rgb) = desk.shot("5b-after-quit");
        for k in IconKind::ALL {
            let n = Desktop::count(&rgb, k);
            assert!(
                n < 20,
                "{k:?} still on screen after Quit ({n} pixels, {})",
                png.display()
            );
        }
        // Quitting a client tray leaves the daemon running.
        assert!(a.try_status().is_some(), "the daemon still answers");
        b.stop();
        a.stop();

        // No daemon: the tray runs the engine itself, and stops it cleanly.
        let c = Node::new("charlie");
        let mut tray = TrayProc::start(&desk, &c.home, c.dir.path().join("tray.log"));
        tray.wait_log("the engine runs inside the tray");
        let st = wait_for(
            "the in-process engine to answer",
            Duration::from_secs(30),
            || c.try_status(),
        );
        assert_eq!(st["name"], "charlie");
        assert!(c.home.join("daemon.json").exists());
        desk.expect_icon(IconKind::Offline, "6-in-process-engine", &tray);
        assert_eq!(tray.stop(), Some(0), "tray exit code\n{}", tray.log());
        assert!(tray.log().contains("engine stopped"), "{}", tray.log());
        assert!(
            !c.home.join("daemon.json").exists(),
            "the engine removed daemon.json on its way out"
        );
        assert!(c.try_status().is_none(), "nothing answers after Quit");
    }
}
