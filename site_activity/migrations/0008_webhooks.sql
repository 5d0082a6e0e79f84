-- Webhooks (visitor_event.created): endpoints per tenant, a durable delivery queue in Postgres, and the log of
-- every attempt. The `site-activity webhooks` stage fills the queue from the enriched topic (only events that
-- are rows in visitor_events) and sends due deliveries (webhooks/).

CREATE TABLE webhook_endpoints (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url              text NOT NULL,
    description      text NOT NULL DEFAULT '',
    -- Filters; NULL = every event type / every widget of the tenant.
    event_types      text[],
    widget_ids       uuid[],
    enabled          boolean NOT NULL DEFAULT true,
    disabled_reason  text,              -- why it was disabled (410 Gone, failing for days, an admin)
    disabled_at      timestamptz,
    failing_since    timestamptz,       -- first failed attempt since the last success; NULL when healthy
    -- The signing secret ("whsec_" + base64). Kept as is: signing needs it (shown to the admin only at create).
    secret           text NOT NULL CONSTRAINT secret_format CHECK (secret LIKE 'whsec\_%'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);

-- One row per (endpoint, stored event): the queue entry and its current state. The unique key makes enqueueing
-- idempotent (the enriched topic may carry an event twice; a rebalance redoes a batch). The foreign key to the
-- event row removes queued and logged deliveries with the event: deleting a widget, erasing a person or the
-- retention purge leave nothing of theirs to send.
CREATE TABLE webhook_deliveries (
    id                    bigserial PRIMARY KEY,
    endpoint_id           uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    widget_id             uuid NOT NULL,
    event_id              uuid NOT NULL,
    webhook_id            text NOT NULL,  -- the webhook-id header: the same on every attempt and replay
    status                text NOT NULL DEFAULT 'pending'
                          CONSTRAINT delivery_status_known CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts              integer NOT NULL DEFAULT 0,  -- attempts in the current round (a replay starts a new one)
    next_attempt_at       timestamptz NOT NULL DEFAULT now(),  -- also the lease of a claimed delivery
    created_at            timestamptz NOT NULL DEFAULT now(),
    last_attempt_at       timestamptz,
    last_response_status  integer,
    last_error            text,
    UNIQUE (endpoint_id, widget_id, event_id),
    FOREIGN KEY (widget_id, event_id) REFERENCES visitor_events (widget_id, event_id) ON DELETE CASCADE
);
-- Claiming due work per endpoint (FOR UPDATE SKIP LOCKED), only over what is still pending.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at) WHERE status = 'pending';
-- The delivery log, newest first per endpoint.
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, id);
-- For the cascade from visitor_events (erase, widget delete, purge).
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (widget_id, event_id);

-- Every attempt: when, the HTTP status (NULL when there was no response), how long it took, the error.
CREATE TABLE webhook_attempts (
    id               bigserial PRIMARY KEY,
    delivery_id      bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    at               timestamptz NOT NULL,
    response_status  integer,
    latency_ms       double precision NOT NULL,
    error            text
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
