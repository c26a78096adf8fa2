-- What a customer answered on the landing page when they asked for activation (the ISV's
-- questions, web.onboarding_fields), and who had signed in to do it. One row per
-- subscription: posting the form again replaces the answers.
CREATE TABLE onboarding_answers (
    subscription_id     uuid        PRIMARY KEY,
    answers             jsonb       NOT NULL,
    signed_in_object_id text        NOT NULL,
    signed_in_tenant_id text        NOT NULL,
    signed_in_email     text,
    submitted_at        timestamptz NOT NULL DEFAULT now()
);
