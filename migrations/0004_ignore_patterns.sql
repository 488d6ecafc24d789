-- 0004_ignore_patterns: the folder's `.ferryignore` rules, as the need computation saw
-- them last.
--
-- Why: a device must not pull (nor delete) names that its own `.ferryignore` excludes, and
-- such a name must not count as needed, or the folder would never be up to date.
-- `global.need` is now computed with the rules the folder loop hands the index. The rules
-- themselves are matched outside the index; this column keeps the text they came from so
-- that the index knows, after a restart, whether the `need` flags it holds were computed
-- with the same rules (then only the needed names are checked again) or with others (then
-- every global of the folder is). Existing folders start at '' (no rules), which is what
-- their `global` rows were computed with, so nothing needs rebuilding here.

ALTER TABLE folders ADD COLUMN ignore_patterns TEXT NOT NULL DEFAULT '';
