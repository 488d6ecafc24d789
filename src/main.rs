//! The `ferry` binary: parses the command line and hands off to the library.

use clap::Parser;

fn main() {
    limit_malloc_arenas();
    ferry::fsutil::raise_open_file_limit();
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
