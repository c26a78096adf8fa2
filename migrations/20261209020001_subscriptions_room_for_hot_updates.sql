-- Every decision rewrites its subscription's row (the machine, about 2 kB, and the
-- counter). With full pages such an update cannot stay on its page, so it is not a HOT
-- update: each one adds an entry to all five indexes and the table and its indexes bloat
-- (measured in `bench pipeline`: 47% of the updates HOT, 100 rows in 811 pages). Pages
-- filled to half leave room for the next version of their rows. Applies to the pages
-- written from now on.
ALTER TABLE subscriptions SET (fillfactor = 70);
