-- 0002_folder_counts: per-folder totals, kept up to date with every change.
--
-- Why: `ferry status`, the tray and the control API ask for these totals often, and
-- summing them from `files` and `global` walks the whole folder (~90 ms per 100k
-- names). The index now adjusts this row in the same transaction whenever a local record
-- or a global changes, so reading the totals is one lookup. Like `global`, it is a cache
-- of the other tables; this migration fills it from them for folders that exist already.

CREATE TABLE folder_counts (
    folder       INTEGER PRIMARY KEY REFERENCES folders (idx) ON DELETE CASCADE,
    -- Non-deleted local regular files (as Syncthing's "files": no directories or
    -- symlinks) and their bytes.
    local_files  INTEGER NOT NULL DEFAULT 0,
    local_bytes  INTEGER NOT NULL DEFAULT 0,
    -- Non-deleted global regular files and their bytes.
    global_files INTEGER NOT NULL DEFAULT 0,
    global_bytes INTEGER NOT NULL DEFAULT 0,
    -- Names with need = 1 (deletions included) and the global bytes they carry.
    need_files   INTEGER NOT NULL DEFAULT 0,
    need_bytes   INTEGER NOT NULL DEFAULT 0
) STRICT;

INSERT INTO folder_counts
    (folder, local_files, local_bytes, global_files, global_bytes, need_files, need_bytes)
SELECT
    fo.idx,
    (SELECT COUNT(*) FROM files f WHERE f.folder = fo.idx AND f.device = 0 AND f.deleted = 0 AND f.kind = 0),
    (SELECT COALESCE(SUM(f.size), 0) FROM files f
       WHERE f.folder = fo.idx AND f.device = 0 AND f.deleted = 0 AND f.kind = 0),
    (SELECT COUNT(*) FROM global g WHERE g.folder = fo.idx AND g.deleted = 0 AND g.kind = 0),
    (SELECT COALESCE(SUM(g.size), 0) FROM global g WHERE g.folder = fo.idx AND g.deleted = 0 AND g.kind = 0),
    (SELECT COUNT(*) FROM global g WHERE g.folder = fo.idx AND g.need = 1),
    (SELECT COALESCE(SUM(g.size), 0) FROM global g WHERE g.folder = fo.idx AND g.need = 1)
FROM folders fo;
