-- The event log's per-subscription sequence is kept on the subscription row: the statement
-- that saves the machine (or bumps the counter) under the row lock also hands out the next
-- sequence, where each append used to lock the row, then scan for max(sequence), then insert.
ALTER TABLE subscriptions ADD COLUMN last_sequence bigint NOT NULL DEFAULT 0;
UPDATE subscriptions s
    SET last_sequence = e.max_sequence
    FROM (SELECT subscription_id, max(sequence) AS max_sequence
          FROM subscription_events GROUP BY subscription_id) e
    WHERE e.subscription_id = s.id;
