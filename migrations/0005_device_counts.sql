-- 0005_device_counts: each remote device's completion, kept up to date with every change.
--
-- Why: a device's completion (how much of the folder's global state it has announced,
-- shown per device by `ferry status` and the control API) was summed over the whole
-- folder on every status call after any write: a join of `global` with that device's
-- rows, ~64 ms per 100,000 names (`cargo bench --bench index`), so during a sync of a
-- million-file folder each status call would have held the index thread for most of a
-- second. Like `folder_counts`, these totals are now adjusted in the same transaction as
-- the records they come from, and reading one is a lookup.
--
-- How: a remote row's `credit` is what it last added to its device's totals:
--   > 0  the global is not deleted and this row has the global version: the global's
--        weight, MAX(size, 1), so that empty files and directories count;
--   -1   the global is a deletion this device has not made yet (its row is not deleted);
--    0   anything else (and always for local rows).
-- When a name's global or a remote row changes, the row's credit is computed again and the
-- difference goes to `device_counts`. The folder's total weight, the sum of MAX(size, 1)
-- over its non-deleted globals, is `folder_counts.global_weight`. A device's completion is
-- have / (global_weight + pending_deletes).

ALTER TABLE files ADD COLUMN credit INTEGER NOT NULL DEFAULT 0;

ALTER TABLE folder_counts ADD COLUMN global_weight INTEGER NOT NULL DEFAULT 0;

-- "How much of folder F has device D?" One row per folder and remote device that has
-- announced anything in it.
CREATE TABLE device_counts (
    folder  INTEGER NOT NULL REFERENCES folders (idx) ON DELETE CASCADE,
    device  INTEGER NOT NULL,
    -- The sum of the positive credits of the device's rows.
    have    INTEGER NOT NULL DEFAULT 0,
    -- How many of its rows have credit -1.
    pending_deletes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (folder, device)
) STRICT;

-- Fill all three from the tables they summarise, for databases that exist already.
UPDATE files SET credit = COALESCE((
    SELECT CASE
             WHEN g.deleted = 0 AND files.version = g.version THEN MAX(g.size, 1)
             WHEN g.deleted = 1 AND files.deleted = 0 THEN -1
             ELSE 0
           END
    FROM global g WHERE g.folder = files.folder AND g.name = files.name), 0)
WHERE device <> 0;

INSERT INTO device_counts (folder, device, have, pending_deletes)
SELECT folder, device,
       SUM(CASE WHEN credit > 0 THEN credit ELSE 0 END),
       SUM(CASE WHEN credit < 0 THEN 1 ELSE 0 END)
FROM files WHERE device <> 0
GROUP BY folder, device;

UPDATE folder_counts SET global_weight = (
    SELECT COALESCE(SUM(MAX(g.size, 1)), 0) FROM global g
    WHERE g.folder = folder_counts.folder AND g.deleted = 0);
