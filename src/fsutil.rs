//! File-system helpers shared by the scanner, the puller and the config writer.
//!
//! What lives here: the temp-file naming rule (`.ferry-tmp-<basename>`, in the same
//! directory as the target, so the final rename never crosses a file system), `fsync` of
//! directories, setting mtimes and permission bits without following symlinks, `lstat`
//! in the shape the index and the puller compare, free space, a rename that refuses to
//! overwrite, and `write_atomic` (temp + fsync + rename + fsync dir).
//!
//! What does not: anything that knows about peers, names from the wire (that is
//! `sync::names`) or the index. Every function here works on plain paths and never
//! follows a symlink unless its doc says so.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::types::FileKind;

/// Every temp file Ferry writes starts with this. The scanner skips such names, peers
/// may not send them, and `sync::puller::cleanup_temp_files` removes old ones.
pub const TEMP_PREFIX: &str = ".ferry-tmp-";

/// Longest file name (one component) most file systems accept, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// The temp name for `name` (a relative `/`-separated name or a path string): the same
/// directory, basename `.ferry-tmp-<basename>`. A basename too long to take the prefix
/// is cut (at a character boundary) and given `~` plus 8 hex digits of its BLAKE3 hash,
/// so two long names never share a temp file and the result still fits in 255 bytes.
pub fn temp_name(name: &str) -> String {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", name),
    };
    let plain_len = TEMP_PREFIX.len() + base.len();
    if plain_len <= MAX_NAME_BYTES {
        return format!("{dir}{TEMP_PREFIX}{base}");
    }
    let hash = blake3::hash(base.as_bytes()).to_hex();
    let suffix = format!("~{}", &hash[..8]);
    let keep = MAX_NAME_BYTES - TEMP_PREFIX.len() - suffix.len();
    let cut = floor_char_boundary(base, keep);
    format!("{dir}{TEMP_PREFIX}{}{suffix}", &base[..cut])
}

/// The largest index `<= max` that is a char boundary of `s`.
pub(crate) fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// True for a basename (not a whole path) that Ferry uses for temp files.
pub fn is_temp_name(basename: &str) -> bool {
    basename.starts_with(TEMP_PREFIX)
}

/// What `lstat` says about a name: the fields the index records and the puller compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskMeta {
    pub kind: FileKind,
    /// Bytes for files; 0 for directories and symlinks (their st_size is meaningless to us).
    pub size: u64,
    /// Nanoseconds since the Unix epoch, as the file system reports it (possibly rounded).
    pub mtime_ns: i64,
    /// Permission bits: the low 12 bits of st_mode (0 where the OS has none).
    pub mode: u32,
    /// Inode number (0 where the OS has none).
    pub inode: u64,
}

/// `lstat` (never follows a symlink). `Ok(None)` when nothing is there (or a parent is not
/// a directory); other errors — permission denied, I/O — are errors, so a caller never
/// mistakes "cannot look" for "nothing there". Names of other kinds (sockets, fifos,
/// devices) are reported as `File` with size 0; the scanner decides whether to skip them.
pub fn try_stat(path: &Path) -> Result<Option<DiskMeta>> {
    match fs::symlink_metadata(path) {
        Ok(md) => Ok(Some(meta_of(&md))),
        Err(e) if e.kind() == io::ErrorKind::NotFound || is_not_a_directory(&e) => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// `(kind, size, mtime_ns, mode, inode)` from `lstat`, or `None` when the name does not
/// exist *or cannot be stat'ed*. Use [`try_stat`] where "cannot look" must not read as
/// "nothing there" (the puller does).
pub fn stat_meta(path: &Path) -> Option<(FileKind, u64, i64, u32, u64)> {
    let m = try_stat(path).ok()??;
    Some((m.kind, m.size, m.mtime_ns, m.mode, m.inode))
}

/// The [`DiskMeta`] of metadata already obtained (from `symlink_metadata` or `File::metadata`).
pub fn meta_of(md: &fs::Metadata) -> DiskMeta {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else {
        FileKind::File
    };
    let size = if ft.is_file() { md.len() } else { 0 };
    DiskMeta {
        kind,
        size,
        mtime_ns: mtime_ns_of(md),
        mode: mode_of(md),
        inode: inode_of(md),
    }
}

#[cfg(unix)]
fn mtime_ns_of(md: &fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

#[cfg(not(unix))]
fn mtime_ns_of(md: &fs::Metadata) -> i64 {
    match md.modified() {
        Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        },
        Err(_) => 0,
    }
}

#[cfg(unix)]
fn mode_of(md: &fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    md.mode() & 0o7777
}

#[cfg(not(unix))]
fn mode_of(md: &fs::Metadata) -> u32 {
    if md.is_dir() {
        0o755
    } else if md.permissions().readonly() {
        0o444
    } else {
        0o644
    }
}

#[cfg(unix)]
fn inode_of(md: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    md.ino()
}

#[cfg(not(unix))]
fn inode_of(_md: &fs::Metadata) -> u64 {
    0
}

#[cfg(unix)]
fn is_not_a_directory(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTDIR)
}

#[cfg(not(unix))]
fn is_not_a_directory(_e: &io::Error) -> bool {
    false
}

/// Makes a rename or a create/delete inside `dir` durable. Without this, a crash right
/// after a rename can bring back the old name on ext4/xfs even though the data was
/// fsynced. A no-op where directories cannot be opened (Windows).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = fs::File::open(dir).at(dir)?;
        d.sync_all().at(dir)?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(unix)]
fn cstring(path: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        )
    })
}

/// Sets the modification time of `path` itself (a symlink's own time, never its
/// target's), in nanoseconds since the epoch. The access time is left alone.
#[cfg(unix)]
pub fn set_mtime(path: &Path, mtime_ns: i64) -> Result<()> {
    let c = cstring(path)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000) as libc::time_t,
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as libc::c_long,
        },
    ];
    // SAFETY: `c` is a valid NUL-terminated string and `times` points at two timespecs,
    // both alive for the duration of the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(Error::io(path, io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the modification time of `path` (follows symlinks on this platform; the puller
/// does not call it on links there).
#[cfg(not(unix))]
pub fn set_mtime(path: &Path, mtime_ns: i64) -> Result<()> {
    use std::time::{Duration, UNIX_EPOCH};
    let t = if mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(mtime_ns.unsigned_abs())
    };
    let f = fs::OpenOptions::new().write(true).open(path).at(path)?;
    f.set_modified(t).at(path)
}

/// Sets the permission bits (low 12 bits) of `path`. Refuses symlinks: on Linux a
/// symlink has no mode of its own and `chmod` would change its target.
#[cfg(unix)]
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let md = fs::symlink_metadata(path).at(path)?;
    if md.file_type().is_symlink() {
        return Err(Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "refusing to chmod a symlink"),
        ));
    }
    if md.permissions().mode() & 0o7777 == mode & 0o7777 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777)).at(path)
}

/// Maps the owner-write bit to the read-only flag, the one permission this OS has.
#[cfg(not(unix))]
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    let md = fs::symlink_metadata(path).at(path)?;
    let mut p = md.permissions();
    p.set_readonly(mode & 0o200 == 0);
    fs::set_permissions(path, p).at(path)
}

/// The soft limit on open files (`RLIMIT_NOFILE`), or `None` where there is none to read.
pub fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit_nofile().map(|l| l.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// A pull round keeps every staged temp file open until the round is installed (up to
/// 1,024 of them, two rounds when one is installed behind the next), beside sockets, the
/// index and the watcher: raises the soft limit on open files (often 1,024) to the hard
/// one, capped at 65,536, as Go does for Syncthing. Called by `main` at start.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    if let Some(mut lim) = rlimit_nofile() {
        let want = lim.rlim_max.min(65_536);
        if lim.rlim_cur < want {
            lim.rlim_cur = want;
            // SAFETY: setrlimit only reads the struct we pass.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        }
    }
}

/// `posix_fadvise(2)`: tells the kernel how a range of `f` will be used (`len` 0: to the
/// end of the file). Only a hint, so a failure is ignored.
#[cfg(target_os = "linux")]
pub fn fadvise(f: &fs::File, off: u64, len: u64, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open file descriptor; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            off as libc::off_t,
            len as libc::off_t,
            advice,
        );
    }
}

/// Reserves disk space for `len` bytes of `f` from `off` without changing its size
/// (`fallocate(2)` with `FALLOC_FL_KEEP_SIZE`): the writes that follow land in blocks the
/// file system already allocated, and a disk too full for them says so now, before any
/// data is moved. `Ok(false)` where the file system cannot do it (then the writes
/// allocate as they go, as without this call).
#[cfg(target_os = "linux")]
pub fn preallocate(f: &fs::File, off: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(true);
    }
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Ok(false);
    };
    loop {
        // SAFETY: a plain syscall on an open file descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, len) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Gives back the space [`preallocate`] reserved beyond the end of `f`, leaving its
/// data and size as they are: a truncation to its own length, which ext4 takes as
/// "drop the blocks past the end" (a hole punched there would not be: ext4 ignores a
/// punch past the end of a file).
pub fn release_preallocated(f: &fs::File) -> io::Result<()> {
    let len = f.metadata()?.len();
    f.set_len(len)
}

#[cfg(not(target_os = "linux"))]
pub fn preallocate(_: &fs::File, _: u64, _: u64) -> io::Result<bool> {
    Ok(false)
}

/// Grows this process's table of file descriptors to hold `fds` at once, now, while the
/// process has one thread. Growing it later, with threads that share it, waits for an RCU
/// grace period each time the table doubles; a daemon's first pull of many small files
/// (whose temp files stay open until installed) paid 11–13 ms for that inside a page
/// (`BENCH_PERF=DIR BENCH_PERF_EVENT=sched:sched_switch bench/compare --scenarios b`, then
/// `bench/perf-offcpu`: `expand_files` < `synchronize_rcu`). The table is a few bytes per
/// descriptor and is never shrunk. Call it after [`raise_open_file_limit`]; it stays
/// within the soft limit.
pub fn reserve_fd_table(fds: u32) {
    #[cfg(unix)]
    {
        let Some(lim) = rlimit_nofile() else { return };
        let top = (fds as u64).min(lim.rlim_cur.saturating_sub(1)) as libc::c_int;
        let Ok(f) = fs::File::open("/dev/null") else {
            return;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own to the lowest free number
        // from `top`; the duplicate is closed right away, and nothing else uses it.
        unsafe {
            let dup = libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top);
            if dup >= 0 {
                libc::close(dup);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = fds;
}

#[cfg(unix)]
fn rlimit_nofile() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// `(available to us, total)` bytes of the file system holding `path` (statvfs).
#[cfg(unix)]
#[allow(clippy::useless_conversion)] // the field types differ between Linux and macOS
pub fn free_space(path: &Path) -> Result<(u64, u64)> {
    let c = cstring(path)?;
    // SAFETY: statvfs is plain old data; an all-zero value is valid and is overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io(path, io::Error::last_os_error()));
    }
    let frsize = u64::from(st.f_frsize);
    let avail = u64::from(st.f_bavail).saturating_mul(frsize);
    let total = u64::from(st.f_blocks).saturating_mul(frsize);
    Ok((avail, total))
}

/// Not measured on this platform: reports unlimited space so nothing is refused.
#[cfg(not(unix))]
pub fn free_space(path: &Path) -> Result<(u64, u64)> {
    let _ = path;
    Ok((u64::MAX, u64::MAX))
}

/// `renameat2(from, to, flags)`: `Ok(true)` when done, `Ok(false)` where this kernel or
/// file system does not support the call or the flag (the caller falls back).
fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let invalid = |_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path");
        let f = std::ffi::CString::new(from.as_os_str().as_bytes()).map_err(invalid)?;
        let t = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(invalid)?;
        // SAFETY: both strings are NUL-terminated and alive for the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                flags,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (from, to, flags);
        Ok(false)
    }
}

/// Swaps `a` and `b` atomically (`renameat2` with `RENAME_EXCHANGE`): both must exist.
/// `Ok(false)` where the kernel or file system cannot (the caller falls back to a plain
/// rename), `Ok(true)` when swapped.
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    let flags = libc::RENAME_EXCHANGE;
    #[cfg(not(target_os = "linux"))]
    let flags = 0;
    renameat2(a, b, flags)
}

/// Renames `from` to `to` unless `to` exists, in which case it fails with
/// `ErrorKind::AlreadyExists` and changes nothing. Atomic on Linux (`renameat2` with
/// `RENAME_NOREPLACE`); elsewhere, or on file systems without it, a check then a rename,
/// which leaves a tiny window in which a file created at `to` by another process is lost.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let flags = libc::RENAME_NOREPLACE;
    #[cfg(not(target_os = "linux"))]
    let flags = 0;
    if renameat2(from, to, flags)? {
        return Ok(());
    }
    match fs::symlink_metadata(to) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", to.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(from, to),
        Err(e) => Err(e),
    }
}

/// This process's umask, read once (Linux: the `Umask:` line of `/proc/self/status`;
/// reading it with `umask(2)` would change it for a moment under other threads). `None`
/// where it cannot be read. Ferry never changes its umask after it starts.
pub fn process_umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        parse_umask(&status)
    })
}

/// The `Umask:` value (octal) of a `/proc/PID/status` text.
fn parse_umask(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

/// Opens `path` for reading, failing if it is a symlink (whose target may be anywhere).
pub fn open_no_follow(path: &Path) -> io::Result<fs::File> {
    let mut o = fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW);
    }
    o.open(path)
}

/// Opens `name` (relative, `/`-separated, checked by `names::check_name`) under the
/// directory `root` for reading, refusing a symlink anywhere on the way, the name itself
/// included, and any path that would leave `root`: checked by the kernel in the same call
/// that opens (Linux 5.6's `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so
/// nothing can be swapped in between a check and the open. `ErrorKind::Unsupported` where
/// the kernel cannot (older, or a sandbox that refuses the call): the caller checks the
/// path itself then. A refused symlink is `ELOOP`, a way out of `root` `EXDEV`.
#[cfg(target_os = "linux")]
pub fn open_beneath(root: &fs::File, name: &str) -> io::Result<fs::File> {
    use rustix::fs::{Mode, OFlags};
    openat2_beneath(root, name, OFlags::RDONLY, Mode::empty())
}

/// Creates the regular file `name` under the directory `root` with permission bits
/// `mode` (less the umask), open for reading and writing, failing if anything exists
/// at that name (`AlreadyExists`). As for [`open_beneath`], the kernel refuses a
/// symlink anywhere on the way (`ELOOP`) and a way out of `root` in the same call;
/// a missing parent is `NotFound`, a parent that is not a directory `ENOTDIR`.
/// `ErrorKind::Unsupported` where the kernel cannot.
#[cfg(target_os = "linux")]
pub fn create_new_beneath(root: &fs::File, name: &str, mode: u32) -> io::Result<fs::File> {
    use rustix::fs::{Mode, OFlags};
    openat2_beneath(
        root,
        name,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL,
        Mode::from_raw_mode(mode & 0o777),
    )
}

#[cfg(target_os = "linux")]
fn openat2_beneath(
    root: &fs::File,
    name: &str,
    flags: rustix::fs::OFlags,
    mode: rustix::fs::Mode,
) -> io::Result<fs::File> {
    use rustix::fs::{OFlags, ResolveFlags};
    use rustix::io::Errno;
    use std::sync::atomic::AtomicBool;
    // Set once the kernel has said it has no openat2: not asked again.
    static MISSING: AtomicBool = AtomicBool::new(false);
    if MISSING.load(Ordering::Relaxed) {
        return Err(io::ErrorKind::Unsupported.into());
    }
    match rustix::fs::openat2(
        root,
        name,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        mode,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(fs::File::from(fd)),
        Err(Errno::NOSYS) | Err(Errno::PERM) => {
            MISSING.store(true, Ordering::Relaxed);
            Err(io::ErrorKind::Unsupported.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Elsewhere the caller checks the path itself (see the Linux version).
#[cfg(not(target_os = "linux"))]
pub fn open_beneath(_root: &fs::File, _name: &str) -> io::Result<fs::File> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Elsewhere the caller checks the path itself (see the Linux version).
#[cfg(not(target_os = "linux"))]
pub fn create_new_beneath(_root: &fs::File, _name: &str, _mode: u32) -> io::Result<fs::File> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Distinguishes concurrent `write_atomic` temp files within one process.
static ATOMIC_SEQ: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content,
/// never a mix: write a temp file beside it, fsync, rename over, fsync the directory.
/// Creates missing parent directories. An existing file's permission bits are kept; a
/// new file gets the process default (use [`write_atomic_mode`] for secrets).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mode = existing_mode(path);
    write_atomic_inner(path, bytes, mode)
}

/// Like [`write_atomic`], but the file has exactly permission bits `mode` from the moment
/// it is created (e.g. 0o600 for keys), so it is never readable by others, even briefly.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_inner(path, bytes, Some(mode))
}

fn existing_mode(path: &Path) -> Option<u32> {
    let md = fs::metadata(path).ok()?;
    Some(mode_of(&md))
}

fn write_atomic_inner(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    fs::create_dir_all(&dir).at(&dir)?;
    // A unique temp name (pid + counter): the CLI and a daemon may write the same config
    // file at once; each must rename its own complete file, never a shared half-written one.
    let mut tmp_base = OsString::from(TEMP_PREFIX);
    tmp_base.push(base);
    tmp_base.push(format!(
        ".{}.{}",
        std::process::id(),
        ATOMIC_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_base);

    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode.unwrap_or(0o666) & 0o7777);
        }
        let mut f = opts.open(&tmp).at(&tmp)?;
        #[cfg(unix)]
        if let Some(m) = mode {
            // The umask may have cleared bits the caller asked for.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(m & 0o7777))
                .at(&tmp)?;
        }
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        drop(f);
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_descriptor_table_is_grown_ahead_within_the_limit() {
        let fd_size = || -> u64 {
            let status = fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
            line["FDSize:".len()..].trim().parse().unwrap()
        };
        raise_open_file_limit();
        let limit = rlimit_nofile().unwrap().rlim_cur;
        let want = 3000u32;
        reserve_fd_table(want);
        assert!(
            fd_size() > u64::from(want).min(limit - 1),
            "FDSize {}",
            fd_size()
        );
        // Far beyond the limit: stays within it (the kernel sizes tables in powers of two).
        reserve_fd_table(u32::MAX);
        assert!(
            fd_size() <= limit.next_power_of_two(),
            "FDSize {}",
            fd_size()
        );
    }

    #[test]
    fn temp_names_sit_beside_the_target() {
        assert_eq!(temp_name("a.txt"), ".ferry-tmp-a.txt");
        assert_eq!(temp_name("x/y/a.txt"), "x/y/.ferry-tmp-a.txt");
        assert!(is_temp_name(".ferry-tmp-a.txt"));
        assert!(!is_temp_name("a.txt"));
        assert!(!is_temp_name("x/.ferry-tmp-a.txt"), "basenames only");
    }

    #[test]
    fn long_temp_names_are_cut_and_stay_distinct() {
        let a = "é".repeat(120) + "a"; // 241 bytes
        let b = "é".repeat(120) + "b";
        let ta = temp_name(&format!("d/{a}"));
        let tb = temp_name(&format!("d/{b}"));
        assert_ne!(ta, tb);
        let base = ta.strip_prefix("d/").unwrap();
        assert!(base.len() <= MAX_NAME_BYTES, "{}", base.len());
        assert!(is_temp_name(base));
    }

    /// Space reserved past the end keeps the size and the data, and is given back without
    /// touching what was written.
    #[cfg(target_os = "linux")]
    #[test]
    fn preallocated_space_keeps_the_size_and_is_given_back() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"kept").unwrap();
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let blocks = |f: &fs::File| f.metadata().unwrap().blocks() * 512;
        let before = blocks(&f);
        let mib = 1 << 20;
        if !preallocate(&f, 4, 4 * mib).unwrap() {
            eprintln!("this file system cannot preallocate; nothing to check");
            return;
        }
        assert_eq!(f.metadata().unwrap().len(), 4, "the size stays");
        assert!(blocks(&f) >= before + 4 * mib - 4096, "{}", blocks(&f));
        release_preallocated(&f).unwrap();
        assert!(blocks(&f) <= before + 4096, "{} after release", blocks(&f));
        assert_eq!(fs::read(&p).unwrap(), b"kept");
        assert!(preallocate(&f, 0, 0).unwrap(), "nothing to reserve");
        // More than any disk holds: refused as full, not silently skipped.
        let e = preallocate(&f, 0, 1 << 62).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EFBIG)),
            "{e}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"kept");
    }

    #[test]
    fn stat_meta_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"hello").unwrap();
        let (kind, size, _, _, inode) = stat_meta(&f).unwrap();
        assert_eq!((kind, size), (FileKind::File, 5));
        assert_ne!(inode, 0);
        #[cfg(unix)]
        {
            let l = dir.path().join("l");
            std::os::unix::fs::symlink("f", &l).unwrap();
            assert_eq!(stat_meta(&l).unwrap().0, FileKind::Symlink);
            let dangling = dir.path().join("d");
            std::os::unix::fs::symlink("nowhere", &dangling).unwrap();
            assert_eq!(stat_meta(&dangling).unwrap().0, FileKind::Symlink);
        }
        assert!(stat_meta(&dir.path().join("missing")).is_none());
        assert!(try_stat(&f.join("under-a-file")).unwrap().is_none());
        assert_eq!(stat_meta(dir.path()).unwrap().0, FileKind::Dir);
    }

    #[cfg(unix)]
    #[test]
    fn mtime_and_mode_are_applied_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        let t = 1_600_000_000_123_456_789i64;
        set_mtime(&f, t).unwrap();
        set_mode(&f, 0o640).unwrap();
        let m = try_stat(&f).unwrap().unwrap();
        assert_eq!(m.mtime_ns, t);
        assert_eq!(m.mode, 0o640);

        let l = dir.path().join("l");
        std::os::unix::fs::symlink("f", &l).unwrap();
        set_mtime(&l, 1_000_000_000_000_000_000).unwrap();
        assert_eq!(
            try_stat(&f).unwrap().unwrap().mtime_ns,
            t,
            "target untouched"
        );
        assert_eq!(
            try_stat(&l).unwrap().unwrap().mtime_ns,
            1_000_000_000_000_000_000
        );
        assert!(set_mode(&l, 0o600).is_err());
        // Before the epoch.
        set_mtime(&f, -1_500_000_000).unwrap();
        assert_eq!(try_stat(&f).unwrap().unwrap().mtime_ns, -1_500_000_000);
    }

    #[test]
    fn free_space_is_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let (avail, total) = free_space(dir.path()).unwrap();
        assert!(total > 0);
        assert!(avail <= total);
    }

    #[test]
    fn rename_exchange_swaps_two_names() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        if rename_exchange(&a, &b).unwrap() {
            assert_eq!(fs::read(&a).unwrap(), b"b");
            assert_eq!(fs::read(&b).unwrap(), b"a");
        }
        assert!(rename_exchange(&a, &dir.path().join("missing")).is_err());
    }

    #[test]
    fn umask_is_read_from_the_status_text() {
        assert_eq!(
            parse_umask("Name:\tferry\nUmask:\t0027\nState:\tR\n"),
            Some(0o027)
        );
        assert_eq!(parse_umask("Name:\tferry\n"), None);
        assert_eq!(parse_umask("Umask:\tzz\n"), None);
        #[cfg(target_os = "linux")]
        {
            // What the kernel says matches what a new file gets.
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f");
            let mut o = fs::OpenOptions::new();
            std::os::unix::fs::OpenOptionsExt::mode(o.write(true).create_new(true), 0o777);
            o.open(&p).unwrap();
            let got =
                std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&p).unwrap().permissions());
            assert_eq!(got & 0o777, 0o777 & !process_umask().unwrap());
        }
    }

    #[test]
    fn rename_noreplace_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"b");
        let c = dir.path().join("c");
        rename_noreplace(&a, &c).unwrap();
        assert_eq!(fs::read(&c).unwrap(), b"a");
        assert!(!a.exists());
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/config.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        #[cfg(unix)]
        {
            let k = dir.path().join("identity.key");
            write_atomic_mode(&k, b"secret", 0o600).unwrap();
            assert_eq!(try_stat(&k).unwrap().unwrap().mode, 0o600);
            write_atomic(&k, b"secret2").unwrap();
            assert_eq!(try_stat(&k).unwrap().unwrap().mode, 0o600, "mode kept");
        }
    }
}
