-- Dead effects an operator gave up on (`fulfillment effects abandon`, the console): no longer
-- listed as needing a person, kept with their history. The journal (operator_actions) says
-- who abandoned or retried which row and why.
ALTER TABLE outbox DROP CONSTRAINT outbox_status_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_status_check
    CHECK (status IN ('pending', 'done', 'dead', 'abandoned'));

-- The dead-effects list pages by id (keyset) over the dead rows only.
CREATE INDEX outbox_dead_idx ON outbox (id) WHERE status = 'dead';
