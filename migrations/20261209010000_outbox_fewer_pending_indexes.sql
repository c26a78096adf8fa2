-- The claim's ordering probe (is an earlier row of the subscription pending?) must stay an
-- index probe on the subscription whatever the statistics say. They are often stale for
-- this table: a burst turns thousands of rows pending within seconds of an ANALYZE that saw
-- none, so the planner thinks a partial index `WHERE status = 'pending'` holds one row, and
-- it may then scan such an index whole for every candidate instead of probing it (seen in
-- `bench burst`: 30-350 ms and up to 125,000 buffers per claim; 17 s for one claim of 64 in
-- a reproduction). A partial index is a candidate for a full scan whenever a query implies
-- its predicate; a plain index only when the query constrains its leading column. So:
--
-- * the probe's index is a plain one, (subscription_id, status, event_sequence, id): the
--   pending rows of a subscription are one range of it. It also replaces the plain index on
--   subscription_id and the partial (subscription_id, event_sequence, id) of pending rows;
-- * no partial index has `status = 'pending'` alone as its predicate, which every query on
--   pending rows implies: the claim index also excludes the deliveries (whose runners have
--   an index of their own), and the claim names its kinds in the statement;
-- * outbox_due_idx (next_attempt_at) and outbox_claim_idx (priority, next_attempt_at) go:
--   the claim index serves a count of due rows, and the deliveries' claim has its own.
--
-- Every outbox row is written at least twice (queued, then ended), never as a HOT update
-- (`status` is indexed), so each index is one more insertion per write: 8 indexes become 6,
-- one of which holds only the deliveries.
DROP INDEX outbox_due_idx;
DROP INDEX outbox_claim_idx;
DROP INDEX outbox_claim_due_idx;
DROP INDEX outbox_pending_subscription_idx;
DROP INDEX outbox_subscription_idx;
CREATE INDEX outbox_claim_due_idx ON outbox (due_at, priority, next_attempt_at)
    WHERE status = 'pending' AND kind <> 'deliver_webhook';
CREATE INDEX outbox_deliveries_claim_idx ON outbox (priority, next_attempt_at)
    WHERE status = 'pending' AND kind = 'deliver_webhook';
CREATE INDEX outbox_subscription_idx ON outbox (subscription_id, status, event_sequence, id);
