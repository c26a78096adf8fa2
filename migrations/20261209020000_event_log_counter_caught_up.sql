-- The event log's next sequence is now `subscriptions.last_sequence + 1`, without also
-- reading the log's newest row (GREATEST with max(sequence)) as every append did since
-- 20261203090000 in case a writer older than the counter had appended without keeping it.
-- Catch up, once, any counter such a writer left behind; every writer of this schema keeps
-- the counter. One index probe per subscription; only the rows behind are rewritten.
UPDATE subscriptions s
    SET last_sequence = (SELECT max(e.sequence) FROM subscription_events e
                         WHERE e.subscription_id = s.id)
    WHERE s.last_sequence < (SELECT coalesce(max(e.sequence), 0) FROM subscription_events e
                             WHERE e.subscription_id = s.id);
