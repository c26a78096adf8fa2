-- When the message behind an event reached us (a webhook's receipt at the ingress), so the
-- event log can show how long Microsoft's 10-second ACK window (P7) was used up.
ALTER TABLE subscription_events ADD COLUMN received_at timestamptz;
