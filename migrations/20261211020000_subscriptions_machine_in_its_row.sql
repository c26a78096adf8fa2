-- A subscription's machine (about 2.7 kB of JSON, compressed to about 1.5 kB) leaves its
-- row about 2.1 kB long, just over the 2 kB above which PostgreSQL moves values into the
-- TOAST table: then every decision that saves the machine also inserts the new value there
-- (and an index entry) and deletes the old one, and every read of the row fetches it back
-- (measured in `bench pipeline`: 0.6 TOAST inserts per change). MAIN keeps compressed
-- values in the row unless the row could not fit a page without moving them. Every
-- column that can be moved is MAIN: with the machine alone kept in the row, PostgreSQL
-- moved the small JSON and text columns out instead (7.5 TOAST inserts per change).
-- Applies to the values written from now on.
ALTER TABLE subscriptions
    ALTER COLUMN machine SET STORAGE MAIN,
    ALTER COLUMN beneficiary SET STORAGE MAIN,
    ALTER COLUMN purchaser SET STORAGE MAIN,
    ALTER COLUMN allowed_customer_operations SET STORAGE MAIN,
    ALTER COLUMN offer_id SET STORAGE MAIN,
    ALTER COLUMN plan_id SET STORAGE MAIN,
    ALTER COLUMN state SET STORAGE MAIN,
    ALTER COLUMN term_unit SET STORAGE MAIN,
    ALTER COLUMN charge_duration SET STORAGE MAIN,
    ALTER COLUMN private_offer_id SET STORAGE MAIN;
