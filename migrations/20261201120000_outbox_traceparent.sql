-- The W3C trace context of the span that decided an effect, so the worker that carries it
-- out later continues the same trace (webhook → decision → call to Microsoft).
ALTER TABLE outbox ADD COLUMN traceparent text;
