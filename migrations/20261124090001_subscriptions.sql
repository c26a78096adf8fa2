-- Current state of every subscription we know of. The machine column holds the whole
-- serialized state machine; the other columns are projections of it for queries.
CREATE TABLE subscriptions (
    id                    uuid        PRIMARY KEY,
    offer_id              text,
    plan_id               text,
    quantity              integer     CHECK (quantity IS NULL OR quantity > 0),
    state                 text        NOT NULL
        CHECK (state IN ('PendingFulfillment', 'Subscribed', 'Suspended', 'Unsubscribed')),
    beneficiary_tenant_id uuid,
    purchaser_tenant_id   uuid,
    machine               jsonb       NOT NULL,
    -- Bumped on every saved transition; lets readers detect concurrent change.
    version               bigint      NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX subscriptions_state_idx ON subscriptions (state);
CREATE INDEX subscriptions_beneficiary_idx ON subscriptions (beneficiary_tenant_id);
CREATE INDEX subscriptions_offer_idx ON subscriptions (offer_id);
