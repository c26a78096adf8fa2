-- Whether a pending row only waits for Microsoft (what it sent has left, e.g. an activation
-- whose POST was answered) and so holds back no later row of its subscription. Written by
-- the effect runner from the effect's typed progress, so the claim query never reads the
-- inside of a progress value.
ALTER TABLE outbox ADD COLUMN awaits_microsoft boolean NOT NULL DEFAULT false;
-- Rows written before the column: the old progress key said the same.
UPDATE outbox SET awaits_microsoft = true
    WHERE status = 'pending' AND kind = 'activate' AND progress @> '{"activate_sent": true}';
