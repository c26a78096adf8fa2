-- What an effect's executor already did on earlier attempts (e.g. "activate was sent",
-- "the PATCH may have reached Microsoft"), so a retry continues instead of starting over.
ALTER TABLE outbox ADD COLUMN progress jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Claiming looks for the oldest pending row of each subscription.
CREATE INDEX outbox_pending_subscription_idx ON outbox (subscription_id, created_at, id)
    WHERE status = 'pending';
