-- The effect execution whose call produced a row's event, when that execution has no
-- `effect:*` row of its own (issue #17): a GET of the subscription is recorded with the
-- observation it fed, one row instead of two. Its calls (request and correlation ids,
-- statuses), attempt, outbox row and note, as the `effect:*` row's `event` would hold them.
-- Adding a nullable column rewrites nothing.
ALTER TABLE subscription_events ADD COLUMN execution jsonb;
