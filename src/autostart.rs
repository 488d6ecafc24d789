//! Start at login: `ferry autostart enable|disable|status` and the tray's check item.
//!
//! The entry starts `ferry tray` (which starts the engine if no daemon runs) with the
//! home it was enabled for:
//!
//! - Linux and other XDG desktops: `$XDG_CONFIG_HOME/autostart/ferry.desktop`
//!   (`~/.config/autostart/` by default), a Desktop Entry every desktop honours;
//! - macOS: a LaunchAgent, `~/Library/LaunchAgents/com.ferry.agent.plist`, read at login;
//! - Windows: the `Ferry` value under `HKCU\Software\Microsoft\Windows\CurrentVersion\Run`,
//!   written with `reg.exe`.
//!
//! Headless machines use the systemd user unit in `packaging/systemd/` instead.
//!
//! The entry texts are built by pure functions, tested on every platform; only the choice
//! of backend depends on the platform this binary was built for.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};

/// Where the entry lives on this platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A `.desktop` file in the XDG autostart directory.
    Xdg(PathBuf),
    /// A launchd property list in `~/Library/LaunchAgents`.
    LaunchAgent(PathBuf),
    /// A value under the current user's Run key.
    RunKey,
}

pub const LAUNCH_AGENT_LABEL: &str = "com.ferry.agent";
const RUN_KEY: &str = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run";
const RUN_VALUE: &str = "Ferry";

fn user_home() -> anyhow::Result<PathBuf> {
    directories::BaseDirs::new()
        .map(|d| d.home_dir().to_path_buf())
        .ok_or_else(|| anyhow!("cannot find your home directory"))
}

/// `$XDG_CONFIG_HOME/autostart`, or `~/.config/autostart` when it is unset or relative
/// (the XDG spec says to ignore a relative value).
pub fn xdg_autostart_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => user_home()?.join(".config"),
    };
    Ok(base.join("autostart"))
}

impl Entry {
    /// The entry for the platform this binary runs on.
    pub fn current() -> anyhow::Result<Entry> {
        if cfg!(target_os = "macos") {
            Ok(Entry::LaunchAgent(
                user_home()?
                    .join("Library/LaunchAgents")
                    .join(format!("{LAUNCH_AGENT_LABEL}.plist")),
            ))
        } else if cfg!(windows) {
            Ok(Entry::RunKey)
        } else {
            Ok(Entry::Xdg(xdg_autostart_dir()?.join("ferry.desktop")))
        }
    }

    /// Where to look, in words: a path or the registry value.
    pub fn location(&self) -> String {
        match self {
            Entry::Xdg(p) | Entry::LaunchAgent(p) => p.display().to_string(),
            Entry::RunKey => format!(r"{RUN_KEY}\{RUN_VALUE}"),
        }
    }

    pub fn is_enabled(&self) -> bool {
        match self {
            Entry::Xdg(p) | Entry::LaunchAgent(p) => p.is_file(),
            Entry::RunKey => Command::new("reg")
                .args(["query", RUN_KEY, "/v", RUN_VALUE])
                .output()
                .is_ok_and(|o| o.status.success()),
        }
    }

    /// Writes the entry so that `exe [--home HOME] tray` starts at login.
    pub fn enable(&self, exe: &Path, home: Option<&Path>) -> anyhow::Result<()> {
        match self {
            Entry::Xdg(p) => write_file(p, &desktop_entry(exe, home)),
            Entry::LaunchAgent(p) => write_file(p, &launch_agent_plist(exe, home)),
            Entry::RunKey => {
                let out = Command::new("reg")
                    .args(["add", RUN_KEY, "/v", RUN_VALUE, "/t", "REG_SZ", "/f", "/d"])
                    .arg(windows_command_line(exe, home))
                    .output()
                    .context("running reg.exe to write the Run key")?;
                if !out.status.success() {
                    bail!(
                        "reg.exe could not write {}: {}",
                        self.location(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Ok(())
            }
        }
    }

    /// Removes the entry; returns whether there was one.
    pub fn disable(&self) -> anyhow::Result<bool> {
        match self {
            Entry::Xdg(p) | Entry::LaunchAgent(p) => match std::fs::remove_file(p) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
            },
            Entry::RunKey => {
                if !self.is_enabled() {
                    return Ok(false);
                }
                let out = Command::new("reg")
                    .args(["delete", RUN_KEY, "/v", RUN_VALUE, "/f"])
                    .output()
                    .context("running reg.exe to remove the Run key value")?;
                if !out.status.success() {
                    bail!(
                        "reg.exe could not remove {}: {}",
                        self.location(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Ok(true)
            }
        }
    }
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::fsutil::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The running binary, as an absolute path (what the entry will start).
pub fn current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the path of this ferry binary")?;
    // Linux reports a binary replaced since start-up (a package upgrade) as "... (deleted)";
    // the file at the plain path is the new version, and that is the one to start.
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(plain) => PathBuf::from(plain),
        None => exe,
    })
}

/// The arguments after the binary: `[--home HOME] tray`.
fn tray_args(home: Option<&Path>) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(h) = home {
        args.push("--home".to_string());
        args.push(h.display().to_string());
    }
    args.push("tray".to_string());
    args
}

/// Quotes one argument of a Desktop Entry `Exec` key (Desktop Entry spec, "The Exec
/// key"), then applies the string escapes every value gets: so `\` inside quotes ends up
/// as four backslashes, and `%` as `%%` (it would start a field code).
pub fn desktop_exec_arg(arg: &str) -> String {
    const RESERVED: &[char] = &[
        ' ', '\t', '\n', '"', '\'', '\\', '>', '<', '~', '|', '&', ';', '$', '*', '?', '#', '(',
        ')', '`',
    ];
    let quoted = if arg.is_empty() || arg.contains(RESERVED) {
        let mut q = String::from("\"");
        for c in arg.chars() {
            if matches!(c, '"' | '`' | '$' | '\\') {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    } else {
        arg.to_string()
    };
    let mut out = String::new();
    for c in quoted.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '%' => out.push_str("%%"),
            c => out.push(c),
        }
    }
    out
}

/// The XDG autostart entry.
pub fn desktop_entry(exe: &Path, home: Option<&Path>) -> String {
    let mut exec = desktop_exec_arg(&exe.display().to_string());
    for a in tray_args(home) {
        exec.push(' ');
        exec.push_str(&desktop_exec_arg(&a));
    }
    format!(
        "[Desktop Entry]\n\
         Type=Application\n\
         Name=Ferry\n\
         GenericName=Folder sync\n\
         Comment=Keep folders identical across your devices\n\
         Exec={exec}\n\
         Icon=ferry\n\
         Terminal=false\n\
         Categories=Network;FileTransfer;\n\
         X-GNOME-Autostart-enabled=true\n"
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The macOS LaunchAgent: runs `ferry tray` at login, in the person's session.
pub fn launch_agent_plist(exe: &Path, home: Option<&Path>) -> String {
    let mut args = format!(
        "        <string>{}</string>\n",
        xml_escape(&exe.display().to_string())
    );
    for a in tray_args(home) {
        args.push_str(&format!("        <string>{}</string>\n", xml_escape(&a)));
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>{LAUNCH_AGENT_LABEL}</string>
    <key>ProgramArguments</key>
    <array>
{args}    </array>
    <key>RunAtLoad</key>
    <true/>
    <key>ProcessType</key>
    <string>Interactive</string>
</dict>
</plist>
"#
    )
}

/// The Run key's command line (Windows quoting: each argument in double quotes).
pub fn windows_command_line(exe: &Path, home: Option<&Path>) -> String {
    let mut s = format!("\"{}\"", exe.display());
    for a in tray_args(home) {
        s.push_str(&format!(" \"{a}\""));
    }
    s
}

/// Turns the `--home` given on the command line (or in `FERRY_HOME`) into an absolute
/// path, so the entry works from whatever directory the desktop starts it in.
pub fn absolute_home(home: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    home.map(|h| std::path::absolute(h).with_context(|| format!("resolving {}", h.display())))
        .transpose()
}

/// `ferry autostart enable|disable|status`.
pub fn run(action: &str, home: Option<&Path>) -> anyhow::Result<i32> {
    let entry = Entry::current()?;
    match action {
        "enable" => {
            let home = absolute_home(home)?;
            let exe = current_exe()?;
            entry.enable(&exe, home.as_deref())?;
            println!("Ferry will start at login (`ferry tray`).");
            println!("Entry: {}", entry.location());
        }
        "disable" => {
            if entry.disable()? {
                println!("Ferry will no longer start at login.");
                println!("Removed: {}", entry.location());
            } else {
                println!("Start at login was not enabled.");
                println!("Entry: {} (not present)", entry.location());
            }
        }
        "status" => {
            let on = entry.is_enabled();
            println!(
                "Start at login: {}",
                if on { "enabled" } else { "disabled" }
            );
            println!(
                "Entry: {}{}",
                entry.location(),
                if on { "" } else { " (not present)" }
            );
        }
        other => bail!("unknown action {other:?}: use enable, disable or status"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_stay_plain() {
        let e = desktop_entry(Path::new("/usr/bin/ferry"), None);
        assert!(e.contains("\nExec=/usr/bin/ferry tray\n"), "{e}");
        let e = desktop_entry(
            Path::new("/usr/bin/ferry"),
            Some(Path::new("/home/me/.ferry-work")),
        );
        assert!(
            e.contains("\nExec=/usr/bin/ferry --home /home/me/.ferry-work tray\n"),
            "{e}"
        );
        assert!(e.starts_with("[Desktop Entry]\nType=Application\n"));
    }

    #[test]
    fn exec_arguments_are_quoted_and_escaped() {
        assert_eq!(desktop_exec_arg("/a b/ferry"), r#""/a b/ferry""#);
        assert_eq!(desktop_exec_arg("100%"), "100%%");
        assert_eq!(desktop_exec_arg(r#"say "hi""#), r#""say \\"hi\\"""#);
        assert_eq!(desktop_exec_arg("$HOME"), r#""\\$HOME""#);
        // A literal backslash becomes four (quoting, then string escapes).
        assert_eq!(desktop_exec_arg(r"a\b"), r#""a\\\\b""#);
        assert_eq!(desktop_exec_arg(""), r#""""#);
    }

    #[test]
    fn launch_agent_names_the_program_and_escapes_xml() {
        let p = launch_agent_plist(Path::new("/Applications/F&F/ferry"), Some(Path::new("/h")));
        assert!(
            p.contains("<string>/Applications/F&amp;F/ferry</string>"),
            "{p}"
        );
        assert!(p.contains(
            "<string>--home</string>\n        <string>/h</string>\n        <string>tray</string>"
        ));
        assert!(p.contains("<key>RunAtLoad</key>\n    <true/>"));
        assert!(p.contains(LAUNCH_AGENT_LABEL));
    }

    #[test]
    fn windows_command_line_quotes_every_argument() {
        assert_eq!(
            windows_command_line(Path::new(r"C:\Program Files\Ferry\ferry.exe"), None),
            r#""C:\Program Files\Ferry\ferry.exe" "tray""#
        );
    }

    #[test]
    fn xdg_entry_enable_disable_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Entry::Xdg(dir.path().join("autostart/ferry.desktop"));
        assert!(!e.is_enabled());
        e.enable(Path::new("/usr/bin/ferry"), None).expect("enable");
        assert!(e.is_enabled());
        assert!(e.disable().expect("disable"));
        assert!(!e.is_enabled());
        assert!(!e.disable().expect("disable again"));
    }
}
