//! The `ferry` binary: parses the command line and hands off to the library.

use clap::Parser;

fn main() {
    limit_malloc_arenas();
    raise_open_file_limit();
    let cli = ferry::cli::Cli::parse();
    let code = match ferry::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// glibc gives each thread that allocates its own arena, and freed 1 MiB block buffers
/// stay resident in them: the sending daemon of a 1 GiB transfer peaked at 60 MiB with the
/// default arenas and 35 MiB with two, at the same speed (bench/results/g-arena-*).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called first thing, before other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// A pull round keeps every staged temp file open until the round is installed (up to
/// 1,024 of them), beside sockets, the index and the watcher: raise the soft limit on open
/// files (often 1,024) to the hard one, capped at 65,536, as Go does for Syncthing.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return;
            }
            let want = lim.rlim_max.min(65_536);
            if lim.rlim_cur < want {
                lim.rlim_cur = want;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}
