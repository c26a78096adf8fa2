-- Lifecycle notices (issue #16 Build 3): the domain events announced ahead of a date the ISV
-- must act by (a term that ends, the end of the suspension grace, of the activation window
-- and of the data retention). The machine's notice plan is written here in the transaction of
-- the decision that changed the state or the term, so a restart loses nothing; the worker
-- emits a row when it is due, once (status 'sent', with the event-log row that announced
-- it). A changed state or term cancels the pending rows it no longer owes.
CREATE TABLE scheduled_notices (
    id              uuid        PRIMARY KEY,
    subscription_id uuid        NOT NULL REFERENCES subscriptions (id),
    kind            text        NOT NULL,
    -- The kind and what it is about, e.g. 'term_ending:30d:2027-01-05': sent at most once.
    notice_key      text        NOT NULL,
    due_at          timestamptz NOT NULL,
    reason          text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'sent', 'cancelled')),
    -- The event-log row of the decision that scheduled, cancelled or sent it last.
    event_id        uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, notice_key)
);

CREATE INDEX scheduled_notices_due_idx ON scheduled_notices (due_at) WHERE status = 'pending';

-- When the subscription entered its current state (the anchor of the grace, activation and
-- retention notices). Rows saved before this migration take it on their next decision.
ALTER TABLE subscriptions ADD COLUMN state_since timestamptz;
