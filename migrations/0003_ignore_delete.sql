-- 0003_ignore_delete: the folder's "ignore deletes" setting, as the need computation
-- sees it.
--
-- Why: a folder set to ignore deletions from other devices keeps its files when a peer
-- deletes them. Before this, such a deletion stayed "needed" forever: the folder never
-- reached 100% and never showed as up to date. `global.need` is now computed with this
-- flag (a deletion is not needed where deletions are ignored); the daemon writes it from
-- config.toml when a folder starts and the index recomputes the deleted globals when it
-- changes. Existing folders start at 0, which is what their `global` rows were
-- computed with, so nothing needs rebuilding here.

ALTER TABLE folders ADD COLUMN ignore_delete INTEGER NOT NULL DEFAULT 0;
