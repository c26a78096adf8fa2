-- A subscription's row is still just over the 2 kB above which PostgreSQL compresses its
-- values, so every decision (three per customer change) compresses the machine anew, and
-- every read decompresses it. With the default method (pglz) that was 5 % of PostgreSQL's
-- CPU in `bench pipeline` (perf); lz4 does the same work several times faster, for about
-- the same size. Applies to the values written from now on.
--
-- lz4 needs a server built with it (PostgreSQL 14 and later usually are: Debian's, Azure
-- Database for PostgreSQL). On one that is not, the column keeps pglz and the migration
-- says so instead of failing: nothing but speed depends on the method.
DO $$
BEGIN
    ALTER TABLE subscriptions ALTER COLUMN machine SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE WARNING 'this PostgreSQL server has no lz4 compression; subscriptions.machine keeps pglz (only slower): %', SQLERRM;
END
$$;
