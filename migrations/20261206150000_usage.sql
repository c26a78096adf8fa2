-- Metered billing (issue #22): usage as the ISV's product reports it, its hourly totals,
-- and the metering dimensions of each plan as listAvailablePlans gives them.

-- One row per reported usage event; `idempotency_key` makes a repeat count once.
CREATE TABLE usage_events (
    id              uuid             PRIMARY KEY,
    idempotency_key text             NOT NULL UNIQUE,
    subscription_id uuid             NOT NULL,
    plan_id         text             NOT NULL,
    dimension       text             NOT NULL,
    quantity        double precision NOT NULL CHECK (quantity > 0),
    effective_at    timestamptz      NOT NULL,
    hour            timestamptz      NOT NULL,
    -- counted: in its hour's total; late: its hour was already submitted, so it is
    -- reported and billed nowhere (never added to an hour sent to Microsoft).
    status          text             NOT NULL CHECK (status IN ('counted', 'late')),
    source          text             NOT NULL DEFAULT 'api',
    received_at     timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_hour_idx ON usage_events (subscription_id, dimension, hour);
CREATE INDEX usage_events_late_idx ON usage_events (received_at) WHERE status = 'late';

-- One row per (subscription, dimension, clock hour): Microsoft's duplicate bucket (§9).
-- `plan_id` is the plan at the hour's first usage. `quantity` grows while the hour is
-- open; `submitted_quantity` is frozen when the hour is first put into a batch and is
-- the only quantity ever sent for it.
CREATE TABLE usage_hours (
    id                 uuid             PRIMARY KEY,
    subscription_id    uuid             NOT NULL,
    plan_id            text             NOT NULL,
    dimension          text             NOT NULL,
    hour               timestamptz      NOT NULL,
    quantity           double precision NOT NULL,
    status             text             NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'submitting', 'accepted', 'duplicate', 'expired', 'rejected')),
    submitted_quantity double precision,
    batch_id           uuid,
    submitted_at       timestamptz,
    settled_at         timestamptz,
    usage_event_id     text,
    -- Microsoft's quantity for a Duplicate, when it differs from ours.
    billed_quantity    double precision,
    reason             text,
    sends              integer          NOT NULL DEFAULT 0,
    created_at         timestamptz      NOT NULL DEFAULT now(),
    updated_at         timestamptz      NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, dimension, hour)
);
CREATE INDEX usage_hours_open_idx ON usage_hours (hour) WHERE status = 'open';
CREATE INDEX usage_hours_batch_idx ON usage_hours (batch_id);

-- Metering dimensions per plan, learned from listAvailablePlans
-- (`planComponents.meteringDimensions[].id`).
CREATE TABLE plan_dimensions (
    offer_id   text        NOT NULL,
    plan_id    text        NOT NULL,
    dimensions text[]      NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (offer_id, plan_id)
);
