-- Append-only event log: one row per event the machine decided on (applied, rejected or
-- ignored), per effect result and per operator action. Its id is the stable id of the
-- domain event (CloudEvents `id`) published for the row.
CREATE TABLE subscription_events (
    id              uuid        PRIMARY KEY,
    subscription_id uuid        NOT NULL,
    -- 1, 2, 3, ... per subscription, assigned under the subscription's row lock.
    sequence        bigint      NOT NULL,
    -- The AMQP message id (the webhook operation id, or a command id) that carried the event.
    message_id      text,
    event_key       text        NOT NULL,
    event_kind      text        NOT NULL,
    event           jsonb       NOT NULL,
    from_state      text        NOT NULL,
    to_state        text        NOT NULL,
    outcome         text        NOT NULL CHECK (outcome IN ('applied', 'rejected', 'ignored', 'recorded')),
    reason          text,
    effects         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    correlation_id  text,
    request_id      text,
    trace_id        text,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, sequence)
);

CREATE INDEX subscription_events_recorded_idx ON subscription_events (recorded_at);

-- History is never rewritten (style.md §12): refuse UPDATE and DELETE outright.
CREATE FUNCTION subscription_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'subscription_events is append-only (% refused)', TG_OP;
END;
$$;

CREATE TRIGGER subscription_events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON subscription_events
    FOR EACH ROW EXECUTE FUNCTION subscription_events_append_only();
