-- The operators' part of the event log: every dead-letter replay and purge (and every
-- reconciliation run), who did it, when, and which message. A dead letter may concern a
-- subscription we have never seen (or none at all), so these rows cannot live in
-- subscription_events; `fulfillment subscription show` merges both into one timeline.
-- A purged message is kept here whole (body and headers), so a purge loses nothing.
CREATE TABLE operator_actions (
    id              uuid        PRIMARY KEY,
    -- 'dlq_replay', 'dlq_purge', 'reconcile'
    action          text        NOT NULL,
    -- `cli:<user>@<host>` for the operator CLI, `worker:reconcile` for the periodic run.
    performed_by    text        NOT NULL,
    performed_at    timestamptz NOT NULL DEFAULT now(),
    subscription_id uuid,
    -- The dead letter's id (its AMQP message id, or `sha256:…` of a body without one).
    dead_letter_id  text,
    queue           text,
    reason          text,
    details         jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX operator_actions_subscription_idx ON operator_actions (subscription_id, performed_at);
CREATE INDEX operator_actions_dead_letter_idx ON operator_actions (dead_letter_id);

-- Append-only, like subscription_events (style.md §12).
CREATE FUNCTION operator_actions_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'operator_actions is append-only (% refused)', TG_OP;
END;
$$;

CREATE TRIGGER operator_actions_no_update_or_delete
    BEFORE UPDATE OR DELETE ON operator_actions
    FOR EACH ROW EXECUTE FUNCTION operator_actions_append_only();
