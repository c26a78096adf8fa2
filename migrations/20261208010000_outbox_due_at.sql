-- The deadline of an ACK row: the webhook's receipt plus Microsoft's 10-second window (P7).
-- Under a backlog the runners claim ACK rows by it, soonest first, ahead of every other
-- row (NULL sorts last); the index serves that order.
ALTER TABLE outbox ADD COLUMN due_at timestamptz;
CREATE INDEX outbox_claim_due_idx ON outbox (due_at, priority, next_attempt_at)
    WHERE status = 'pending';
