//! The `ferry` binary: parses the command line and hands off to the library.

use clap::Parser;

fn main() {
    tune_malloc();
    ferry::fsutil::raise_open_file_limit();
    // Two pages of staged small files (see `sync::folder`) and room for the rest.
    ferry::fsutil::reserve_fd_table(4096);
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
///
/// And it gives memory back too eagerly for block buffers: with its moving thresholds, a
/// freed 256 KiB buffer at the top of an arena went back to the kernel, and the next one
/// was faulted in again page by page (the receiving daemon of a 1 GiB transfer spent about
/// a tenth of its CPU in page faults). Fixed thresholds keep up to 2 MiB of free memory
/// per arena for reuse (8 MiB saved no more CPU); allocations from 4 MiB on are mapped and
/// unmapped on their own.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called first thing, before other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 20);
    }
}
