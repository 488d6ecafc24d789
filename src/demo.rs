//! `ferry demo`: two devices on this machine, paired over 127.0.0.1, syncing a generated
//! folder — the quickest way to see Ferry work.
//!
//! Both engines run in this process, each with its own home under one temp directory,
//! mDNS off, listening on 127.0.0.1 only. Device A's control API is served, so
//! `ferry --home <A's home> status` works while the demo runs. Ctrl-C stops both engines
//! and removes the temp directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::oneshot;

use crate::cli::human_bytes;
use crate::client::DaemonInfo;
use crate::config::{Config, FolderType, Home};
use crate::daemon::{self, DaemonHandle, RunOptions};
use crate::error::{Error, Result};

/// Sample folder: this many files, spread over a few directories.
const SAMPLE_FILES: u64 = 300;
const SAMPLE_DIRS: u64 = 10;

pub struct DemoOptions {
    /// Exit after the demonstration instead of waiting for Ctrl-C.
    pub no_wait: bool,
    /// Keep the demo directory on exit.
    pub keep: bool,
}

pub fn run(opts: DemoOptions) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::Invalid(e.to_string()))?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let r = rt.block_on(demo(dir.path(), &opts));
    if opts.keep {
        let kept = dir.keep();
        println!("Kept {}", kept.display());
    }
    r
}

fn setup_home(root: &Path, name: &str) -> Result<Home> {
    let home = Home::resolve(Some(&root.join(name).join("home")))?;
    let mut cfg = Config::new_default(Some(name.to_string()));
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    cfg.api.address = "127.0.0.1:0".into();
    cfg.mdns = false;
    cfg.save(&home.config_path())?;
    Ok(home)
}

/// Deterministic sample content: text-ish files of varied sizes (1 KiB – 256 KiB).
fn generate(folder: &Path) -> Result<u64> {
    let mut total = 0;
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for i in 0..SAMPLE_FILES {
        let dir = folder.join(format!("dir-{:02}", i % SAMPLE_DIRS));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1024 + (x % (256 * 1024)) as usize;
        let body: Vec<u8> = (0..len)
            .map(|j| b"ferry moves files between devices\n"[(j + i as usize) % 34])
            .collect();
        let p = dir.join(format!("file-{i:03}.txt"));
        std::fs::write(&p, &body).map_err(|e| Error::io(&p, e))?;
        total += len as u64;
    }
    Ok(total)
}

async fn demo(root: &Path, opts: &DemoOptions) -> Result<()> {
    println!("Ferry demo: two devices, A and B, on this machine (127.0.0.1 only, no mDNS).");
    let home_a = setup_home(root, "device-a")?;
    let home_b = setup_home(root, "device-b")?;
    let folder_a = root.join("device-a").join("Sync");
    let folder_b = root.join("device-b").join("Sync");
    std::fs::create_dir_all(&folder_a).map_err(|e| Error::io(&folder_a, e))?;
    std::fs::create_dir_all(&folder_b).map_err(|e| Error::io(&folder_b, e))?;
    let total = generate(&folder_a)?;
    println!(
        "Generated {SAMPLE_FILES} files ({}) in {}",
        human_bytes(total),
        folder_a.display()
    );

    let opts_run = RunOptions { no_mdns: true };
    let a = daemon::start(home_a.clone(), opts_run.clone()).await?;
    let b = daemon::start(home_b.clone(), opts_run).await?;
    let (api_stop, api_stop_rx) = oneshot::channel();
    let (api_addr, _api_task) = crate::api::serve(a.clone(), "127.0.0.1:0", api_stop_rx).await?;
    let info = DaemonInfo {
        pid: std::process::id(),
        api: api_addr.to_string(),
    };
    crate::fsutil::write_atomic(
        &home_a.daemon_path(),
        serde_json::to_string(&info).unwrap_or_default().as_bytes(),
    )?;

    let result = pair_and_show(&a, &b, &folder_a, &folder_b, total).await;

    if result.is_ok() {
        println!();
        println!("The two folders:");
        println!("  A: {}", folder_a.display());
        println!("  B: {}", folder_b.display());
        println!(
            "Status of A while this runs: ferry --home {} status",
            home_a.config_dir.display()
        );
        println!();
        println!("To pair two real devices:");
        println!("  on each:       ferry run            (or ferry tray)");
        println!("  on the first:  ferry folder add ~/Documents --id docs");
        println!("                 ferry invite --folder docs");
        println!("  on the second: ferry join <the invite it printed>");
        println!("Or by ID: ferry device add <other device's ID> on both sides.");
        if !opts.no_wait {
            println!();
            println!("Edit files in either folder and watch them sync. Ctrl-C stops the demo and removes it.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    println!("Stopping…");
    let _ = api_stop.send(());
    let _ = std::fs::remove_file(home_a.daemon_path());
    a.stop().await;
    b.stop().await;
    result
}

async fn pair_and_show(
    a: &DaemonHandle,
    b: &DaemonHandle,
    folder_a: &Path,
    folder_b: &Path,
    total: u64,
) -> Result<()> {
    let (ida, idb) = (a.device_id(), b.device_id());
    let addr_a: Vec<String> = a.status().await?.listen;
    let addr_b: Vec<String> = b.status().await?.listen;
    a.update_config(|c| c.add_device(idb, Some("B".into()), addr_b.clone(), ida))
        .await?;
    b.update_config(|c| c.add_device(ida, Some("A".into()), addr_a.clone(), idb))
        .await?;
    let fa = folder_a.to_path_buf();
    a.update_config(move |c| {
        c.add_folder(
            &fa,
            Some("demo".into()),
            Some("Demo".into()),
            FolderType::SendReceive,
        )?;
        c.share_folder("demo", idb)
    })
    .await?;
    let fb = folder_b.to_path_buf();
    b.update_config(move |c| {
        c.add_folder(
            &fb,
            Some("demo".into()),
            Some("Demo".into()),
            FolderType::SendReceive,
        )?;
        c.share_folder("demo", ida)
    })
    .await?;
    println!("A is {ida}");
    println!("B is {idb}");

    // Initial sync, with a progress bar on B's side.
    let started = Instant::now();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "Syncing A → B [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = b.status().await?;
        if let Some(f) = st.folders.iter().find(|f| f.id == "demo") {
            bar.set_position(f.local_bytes.min(total));
            bar.set_message(format!("{} files", f.local_files));
            if f.local_files >= SAMPLE_FILES && f.need_files == 0 && f.local_bytes == total {
                break;
            }
        }
        if Instant::now() > deadline {
            bar.abandon();
            return Err(Error::Invalid(
                "the demo folder did not sync within 2 minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    println!(
        "Synced {SAMPLE_FILES} files ({}) from A to B in {:.2} s.",
        human_bytes(total),
        started.elapsed().as_secs_f64()
    );

    // One edit on each side, timed from the write until the content is on the other side.
    for (from, to, name) in [(folder_a, folder_b, "A"), (folder_b, folder_a, "B")] {
        let file = format!("hello-from-{}.txt", name.to_lowercase());
        let body = format!("Written on device {name}.\n");
        let t = Instant::now();
        std::fs::write(from.join(&file), &body).map_err(|e| Error::io(from.join(&file), e))?;
        let target: PathBuf = to.join(&file);
        let limit = Instant::now() + Duration::from_secs(30);
        loop {
            if std::fs::read(&target).ok().as_deref() == Some(body.as_bytes()) {
                break;
            }
            if Instant::now() > limit {
                return Err(Error::Invalid(format!("{file} did not arrive within 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        println!(
            "Edit on {name}: {file} arrived on the other device in {} ms.",
            t.elapsed().as_millis()
        );
    }
    Ok(())
}
