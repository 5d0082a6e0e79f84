-- Site Activity: tenants, widget configs, CRM contacts, visitor events, audit log.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE widget_configs (
    id                    uuid PRIMARY KEY,
    tenant_id             uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                  text NOT NULL,
    tracking_enabled      boolean NOT NULL DEFAULT false,
    event_retention_days  integer NOT NULL DEFAULT 90
                          CONSTRAINT event_retention_days_range CHECK (event_retention_days BETWEEN 1 AND 365),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX widget_configs_tenant ON widget_configs (tenant_id);

-- The CRM contact an identify() call stitches a visitor to. The id is derived from (tenant_id, external_id)
-- by the processors (uuid5), so events can carry it before this row exists.
CREATE TABLE customers (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    external_id  text NOT NULL,
    email        text,
    name         text,
    traits       jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Per-trait event time of the value kept, so a late identify never overwrites a newer trait.
    trait_times  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, external_id)
);

CREATE TABLE visitor_events (
    widget_id    uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    event_id     uuid NOT NULL,
    tenant_id    uuid NOT NULL,
    visitor_id   text NOT NULL,
    event_type   text NOT NULL
                 CONSTRAINT event_type_known CHECK (event_type IN ('pageview', 'session_start', 'custom', 'identify')),
    name         text,
    url          text,
    referrer     text,
    properties   jsonb NOT NULL DEFAULT '{}'::jsonb,
    user_id      text,
    customer_id  uuid REFERENCES customers (id) ON DELETE SET NULL,
    session_id   uuid,
    occurred_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (widget_id, event_id)
);
CREATE INDEX visitor_events_widget_time ON visitor_events (widget_id, occurred_at);
CREATE INDEX visitor_events_visitor_timeline ON visitor_events (tenant_id, visitor_id, occurred_at);
CREATE INDEX visitor_events_customer_timeline ON visitor_events (customer_id, occurred_at) WHERE customer_id IS NOT NULL;

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    tenant_id   uuid,
    entity      text NOT NULL,
    entity_id   text NOT NULL,
    old_value   jsonb,
    new_value   jsonb
);
CREATE INDEX audit_log_entity ON audit_log (entity, entity_id, at);
