-- 0001_init: the first Ferry index schema.
--
-- Why this shape: the index must answer three questions fast on folders of a million
-- names without loading them: "what did I record about this local name?" (the scanner),
-- "what is the newest version of this name anyone has, and do I need it?" (the puller),
-- and "where on my disk is a block with this hash?" (block reuse). Records of every
-- device live in one `files` table; `global` caches the winner per name so that "need"
-- is an indexed lookup instead of a cross-device comparison at query time.
--
-- Conventions: every table is STRICT. Unsigned 64-bit numbers from the protocol (index
-- IDs, short device IDs, inodes) are stored as the signed integer with the same bits.
-- This file is applied once, inside a transaction, and recorded as `PRAGMA user_version
-- = 1`. Never edit it once released: add `0002_….sql` instead.

-- One row per synced folder. `idx` is the compact key the other tables use, so the
-- folder's string ID is stored once.
CREATE TABLE folders (
    idx          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    -- Random, non-zero, chosen when the folder is created here. Peers remember which
    -- index ID they hold records of; a new ID (database rebuilt) makes them resend all.
    index_id     INTEGER NOT NULL CHECK (index_id <> 0),
    -- The local sequence counter: the highest sequence given to a local record. Kept
    -- here (not MAX(files.sequence)) so it never goes backwards when rows are deleted.
    max_sequence INTEGER NOT NULL DEFAULT 0
) STRICT;

-- Devices whose records we hold. idx 0 is reserved for this device, whose own ID the
-- index does not need to know (its device_id is NULL); remote devices carry their
-- 32-byte public key.
CREATE TABLE devices (
    idx       INTEGER PRIMARY KEY,
    device_id BLOB UNIQUE,
    CHECK ((idx = 0 AND device_id IS NULL) OR (idx <> 0 AND length(device_id) = 32))
) STRICT;
INSERT INTO devices (idx, device_id) VALUES (0, NULL);

-- Every record of every device: the local index (device 0) and each peer's announced
-- index. One row per (folder, name, device).
CREATE TABLE files (
    id             INTEGER PRIMARY KEY,
    folder         INTEGER NOT NULL REFERENCES folders (idx) ON DELETE CASCADE,
    device         INTEGER NOT NULL REFERENCES devices (idx) ON DELETE CASCADE,
    name           TEXT    NOT NULL,
    kind           INTEGER NOT NULL,           -- 0 file, 1 dir, 2 symlink
    size           INTEGER NOT NULL,           -- bytes; 0 for dirs, symlinks, tombstones
    mtime_ns       INTEGER NOT NULL,           -- ns since the Unix epoch
    mode           INTEGER NOT NULL,           -- low 12 bits of st_mode
    deleted        INTEGER NOT NULL,           -- 1 = tombstone
    version        BLOB    NOT NULL,           -- VersionVector::to_bytes, canonical form
    sequence       INTEGER NOT NULL,           -- in the announcing device's index
    modified_by    INTEGER NOT NULL,           -- short ID of the device that made it
    symlink_target TEXT,
    inode          INTEGER NOT NULL DEFAULT 0, -- local rows only: the scanner's quick check
    blocks         BLOB    NOT NULL,           -- 44 bytes per block: offset u64, size u32, hash
    -- (folder, name, device) rather than (folder, device, name): the hot path is
    -- "all devices' rows for one name" when recomputing that name's global version,
    -- and this order also serves the single-row lookup and prefix scans of names.
    UNIQUE (folder, name, device)
) STRICT;

-- Per-device walks in sequence order: sending our index from a peer's last sequence
-- (device 0), and dropping or forgetting one device's records.
CREATE INDEX files_by_sequence ON files (folder, device, sequence);

-- Where local data can be found by hash, so the puller copies blocks it already has
-- (moved, copied, shifted content) instead of fetching them. Only LOCAL, non-deleted
-- files have rows here: remote rows say nothing about what is on this disk. Keyed by
-- (file, start) so a file's rows are written together and replaced together.
CREATE TABLE blocks (
    file     INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    start    INTEGER NOT NULL,         -- byte offset in the file
    size     INTEGER NOT NULL,
    hash     BLOB    NOT NULL,         -- BLAKE3, 32 bytes
    -- The first 8 bytes of the hash as an integer. Hashes are random, so every insert
    -- lands on a random page of the lookup index; an 8-byte integer key keeps that
    -- index less than half the size of one on the 32-byte hash, and a scan of 100k new
    -- files ~25% faster (benches/index.rs). Lookups match on both columns.
    hash_key INTEGER NOT NULL,
    PRIMARY KEY (file, start)
) STRICT, WITHOUT ROWID;

-- The lookup itself.
CREATE INDEX blocks_by_hash ON blocks (hash_key);

-- The global version of each name, recomputed for one name whenever any device's record
-- of it changes. A cache of `files`: it can always be rebuilt from it.
CREATE TABLE global (
    folder     INTEGER NOT NULL REFERENCES folders (idx) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    -- The device whose row is the winner; this device (0) whenever its version is equal,
    -- so "global == local" is a cheap check.
    device     INTEGER NOT NULL,
    version    BLOB    NOT NULL,
    kind       INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    deleted    INTEGER NOT NULL,
    -- 1 when this device must act on the name: the global version differs from the local
    -- one (a deletion is not needed when the name is already absent or deleted here).
    need       INTEGER NOT NULL,
    -- Pull order, precomputed so the need list is read from an index in order instead
    -- of sorted: class 0 directories (key = depth, shallow first), class 1 files and
    -- symlinks (key = size, small first), class 2 deletions (key = -depth, so children
    -- go before their directory).
    need_class INTEGER NOT NULL,
    need_key   INTEGER NOT NULL,
    PRIMARY KEY (folder, name)
) STRICT, WITHOUT ROWID;

-- Only needed names are indexed: on a folder in sync this index is empty, and the need
-- list and need counts never touch the rest of the table.
CREATE INDEX global_need ON global (folder, need_class, need_key, name) WHERE need = 1;

-- What we hold of each peer's index of each folder: its index ID and the highest
-- sequence received, sent back to the peer on connect so it resumes from there.
CREATE TABLE remote_indexes (
    folder       INTEGER NOT NULL REFERENCES folders (idx) ON DELETE CASCADE,
    device       INTEGER NOT NULL REFERENCES devices (idx) ON DELETE CASCADE,
    index_id     INTEGER NOT NULL,
    max_sequence INTEGER NOT NULL,
    PRIMARY KEY (folder, device)
) STRICT, WITHOUT ROWID;
