//! Serves block requests from peers: only for folders shared with the asking device,
//! only for names that pass the same checks as names we pull, and never for a name this
//! device ignores (a peer could otherwise read, by guessing its name, a file kept out of
//! the sync on purpose; Syncthing refuses those too). The data is not hashed
//! here: the requester verifies every block anyway (and stops asking a device whose data
//! does not match), so hashing on both sides would only double the CPU per byte.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;
use tracing::debug;

use super::source::{read_file_at, read_file_cached};
use super::Ctx;
use crate::fsutil;
use crate::ignore::Ignores;
use crate::protocol::{BlockRequest, BlockResponse, MAX_BLOCK_SIZE};
use crate::types::DeviceId;

pub fn serve(ctx: &Ctx, peer: DeviceId, req: BlockRequest, reply: oneshot::Sender<BlockResponse>) {
    let Some(root) = allowed_root(ctx, &peer, &req) else {
        let _ = reply.send(BlockResponse::Refused);
        return;
    };
    let f = match open_for(&root, File::open(&root).ok().as_ref(), &req) {
        Ok(f) => f,
        Err(refused_or_missing) => {
            let _ = reply.send(refused_or_missing);
            return;
        }
    };
    // Data in the page cache (as it usually is: just scanned, or just written) is
    // answered here; only a read that would wait for the disk goes to the blocking pool.
    if let Some(d) = read_file_cached(&f, req.offset, req.size) {
        let _ = reply.send(BlockResponse::Data(d));
        return;
    }
    tokio::task::spawn_blocking(move || {
        let _ = reply.send(read(&f, &req));
    });
}

/// Serves a batch of small blocks: each checked as in [`serve`], all read in one pass on
/// one blocking thread (a batch is at most 1 MiB), answered in order.
pub fn serve_batch(
    ctx: &Ctx,
    peer: DeviceId,
    reqs: Vec<BlockRequest>,
    reply: oneshot::Sender<Vec<BlockResponse>>,
) {
    // Folder roots and rules looked up once per folder, not once per block.
    let mut shared: HashMap<&str, Option<(PathBuf, Ignores)>> = HashMap::new();
    let roots: Vec<Option<PathBuf>> = reqs
        .iter()
        .map(|r| {
            let folder = shared
                .entry(r.folder.as_str())
                .or_insert_with(|| served_folder(ctx, &peer, &r.folder));
            let (root, ignores) = folder.as_ref()?;
            may_ask(r, ignores).then(|| root.clone())
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let _ = reply.send(read_batch(&reqs, roots));
    });
}

/// The reads of [`serve_batch`], each request with the root of its folder if it may be
/// served (`None`: refused). Each name is opened beneath its folder's directory by the
/// kernel ([`fsutil::open_beneath`]): no symlink on the way or at the name itself, nothing
/// outside the folder, and no metadata call per path component.
fn read_batch(reqs: &[BlockRequest], roots: Vec<Option<PathBuf>>) -> Vec<BlockResponse> {
    let mut dirs: HashMap<PathBuf, Option<File>> = HashMap::new();
    reqs.iter()
        .zip(roots)
        .map(|(req, root)| {
            let Some(root) = root else {
                return BlockResponse::Refused;
            };
            // Opened once per folder (and its path copied once, not once per block).
            if !dirs.contains_key(&root) {
                dirs.insert(root.clone(), File::open(&root).ok());
            }
            match open_for(&root, dirs[&root].as_ref(), req) {
                Ok(f) => read(&f, req),
                Err(refused_or_missing) => refused_or_missing,
            }
        })
        .collect()
}

/// Opens the file `req` names in the folder at `root` (`dir`: that directory, open):
/// beneath it by the kernel ([`fsutil::open_beneath`]: no symlink on the way or at the
/// name itself, nothing outside the folder), or where the kernel cannot, by a path
/// checked step by step and opened without following a symlink at its end. `Err` is the
/// answer to give instead.
fn open_for(root: &Path, dir: Option<&File>, req: &BlockRequest) -> Result<File, BlockResponse> {
    match dir.map(|d| fsutil::open_beneath(d, &req.name)) {
        Some(Ok(f)) => Ok(f),
        Some(Err(e)) if e.kind() != io::ErrorKind::Unsupported => Err(match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EXDEV) => BlockResponse::Refused,
            _ => BlockResponse::NotFound,
        }),
        _ => match super::names::safe_join(root, &req.name) {
            Ok(p) => fsutil::open_no_follow(&p).map_err(|_| BlockResponse::NotFound),
            Err(_) => Err(BlockResponse::Refused),
        },
    }
}

/// The root of `req`'s folder, if `peer` may read it: the folder is shared with it, the
/// size is within the protocol's limit and the name is one a peer may give and this
/// device does not ignore.
fn allowed_root(ctx: &Ctx, peer: &DeviceId, req: &BlockRequest) -> Option<PathBuf> {
    let (root, ignores) = served_folder(ctx, peer, &req.folder)?;
    may_ask(req, &ignores).then_some(root)
}

/// The request's size and name are ones a peer may ask for, and the name is not one the
/// folder's rules (`ignores`) keep out of the sync.
fn may_ask(req: &BlockRequest, ignores: &Ignores) -> bool {
    let ok = req.size <= MAX_BLOCK_SIZE && super::names::check_name(&req.name).is_ok();
    if ok && ignores.is_ignored(&req.name, false) {
        debug!(folder = %req.folder, name = %req.name, "block request for an ignored name");
        return false;
    }
    ok
}

/// The root and ignore rules of `folder` if it is shared with `peer` and its loop has
/// read its rules (until then nothing in it is served: what it ignores is not known).
fn served_folder(ctx: &Ctx, peer: &DeviceId, folder: &str) -> Option<(PathBuf, Ignores)> {
    let Some(root) = ctx.shared_with(folder, peer).map(|f| f.path) else {
        debug!(device = %peer, %folder, "block request for a folder not shared with it");
        return None;
    };
    let Some(ignores) = ctx.folder_ignores(folder) else {
        debug!(%folder, "block request before the folder's ignore rules were read");
        return None;
    };
    Some((root, ignores))
}

fn read(f: &File, req: &BlockRequest) -> BlockResponse {
    match read_file_at(f, req.offset, req.size) {
        Some(d) => BlockResponse::Data(d),
        None => BlockResponse::NotFound,
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn req(name: &str, offset: u64, size: u32) -> BlockRequest {
        BlockRequest {
            folder: "f".into(),
            name: name.into(),
            offset,
            size,
            hash: [0; 32],
        }
    }

    /// A batch is served from files in the folder only: not through a symlink the folder
    /// holds (a peer can make one there by syncing it, then ask for its "blocks"), not
    /// through a symlinked directory, not when the folder is not shared.
    #[test]
    fn a_batch_reads_files_in_the_folder_and_never_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("folder");
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::fs::write(root.join("dir/file"), b"0123456789").unwrap();
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, b"not for peers").unwrap();
        std::os::unix::fs::symlink(&secret, root.join("link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), root.join("dirlink")).unwrap();

        let reqs = vec![
            req("dir/file", 2, 5),
            req("link", 0, 5),
            req("dirlink/secret", 0, 5),
            req("dir/missing", 0, 5),
            req("dir/file", 8, 5),
            req("dir/file", 0, 5),
        ];
        let mut roots = vec![Some(root.clone()); reqs.len()];
        roots[5] = None;
        let got = read_batch(&reqs, roots);
        assert_eq!(got[0], BlockResponse::Data(b"23456".to_vec()));
        assert_eq!(got[1], BlockResponse::Refused, "read through a symlink");
        assert_eq!(
            got[2],
            BlockResponse::Refused,
            "read through a symlinked directory"
        );
        assert_eq!(got[3], BlockResponse::NotFound);
        assert_eq!(got[4], BlockResponse::NotFound, "past the end");
        assert_eq!(got[5], BlockResponse::Refused, "not shared");

        // The single-block path opens the same way; where the kernel cannot, the path is
        // checked step by step and a link at its end is not followed either.
        let dir = File::open(&root).unwrap();
        let open = |dir: Option<&File>, name: &str| open_for(&root, dir, &req(name, 0, 5));
        assert!(matches!(
            open(Some(&dir), "link"),
            Err(BlockResponse::Refused)
        ));
        assert!(matches!(open(None, "link"), Err(BlockResponse::NotFound)));
        assert!(matches!(
            open(None, "dirlink/secret"),
            Err(BlockResponse::Refused)
        ));
        let f = open(None, "dir/file").unwrap();
        assert_eq!(
            read(&f, &req("dir/file", 3, 4)),
            BlockResponse::Data(b"3456".to_vec())
        );
    }
}
