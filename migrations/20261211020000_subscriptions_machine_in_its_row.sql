-- A subscription's machine (about 2.7 kB of JSON, compressed to about 1.5 kB) leaves its
-- row about 2.1 kB long, just over the 2 kB above which PostgreSQL moves a compressed
-- value into the TOAST table: then every decision that saves the machine also inserts the
-- new value there (and an index entry) and deletes the old one, and every read of the row
-- fetches it back (measured in `bench pipeline`: 0.6 TOAST inserts per change). MAIN keeps
-- the compressed value in the row unless the row could not fit a page without moving it.
-- Applies to the values written from now on.
ALTER TABLE subscriptions ALTER COLUMN machine SET STORAGE MAIN;
