-- What the 2026 marketplace says about a purchase beyond plan and seats (marketplace-api.md
-- §15.3), projected from the machine for the entitlement API and for queries: the term unit
-- as sent (`PAY` and custom ISO-8601 durations such as `P18M` included, never refused), the
-- billing period inside the term, the private offer the purchase came through, both
-- identities (the purchaser differs from the beneficiary for CSP and multiparty purchases;
-- `emailId` may be null), and what Microsoft lets the customer's side do (`["Read"]` for
-- CSP purchases). Rows saved before this migration fill in on their next decision.
ALTER TABLE subscriptions
    ADD COLUMN term_unit                   text,
    ADD COLUMN charge_duration             text,
    ADD COLUMN private_offer_id            text,
    ADD COLUMN beneficiary                 jsonb,
    ADD COLUMN purchaser                   jsonb,
    ADD COLUMN allowed_customer_operations text[];

CREATE INDEX subscriptions_private_offer_idx ON subscriptions (private_offer_id)
    WHERE private_offer_id IS NOT NULL;
