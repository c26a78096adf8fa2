-- Claiming in O(log n): the runner walks one index in claim order and stops at the first
-- row that is claimable, instead of sorting every due row on every claim.
--
-- event_sequence: the event-log sequence of the decision that queued the row, copied so
-- the "oldest pending row of its subscription" check needs no join.
-- priority: 0 for the rows of a subscription with an ACK pending (Microsoft's 10-second
-- window, P7), 1 otherwise.
ALTER TABLE outbox ADD COLUMN event_sequence bigint;
UPDATE outbox o SET event_sequence = e.sequence
    FROM subscription_events e WHERE e.id = o.event_id;
UPDATE outbox SET event_sequence = 0 WHERE event_sequence IS NULL;
ALTER TABLE outbox ALTER COLUMN event_sequence SET NOT NULL;

ALTER TABLE outbox ADD COLUMN priority smallint NOT NULL DEFAULT 1;
UPDATE outbox SET priority = 0
    WHERE status = 'pending'
      AND subscription_id IN (SELECT subscription_id FROM outbox
                              WHERE status = 'pending' AND kind = 'ack_operation');

DROP INDEX outbox_pending_subscription_idx;
CREATE INDEX outbox_pending_subscription_idx ON outbox (subscription_id, event_sequence, id)
    WHERE status = 'pending';
CREATE INDEX outbox_claim_idx ON outbox (priority, next_attempt_at) WHERE status = 'pending';

-- A domain event's position among its decision's domain events (its CloudEvents id) is
-- counted by event_id: without this index every publish scanned the whole outbox.
CREATE INDEX outbox_event_idx ON outbox (event_id);
