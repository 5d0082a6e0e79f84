-- Export bundles (issue 13): one row per export job asked for through the console API. The console process
-- runs them (site_activity/export_jobs.py): a worker claims a queued job with FOR UPDATE SKIP LOCKED and holds a
-- lease it renews while it writes; a job whose lease ran out (its worker died) is claimed again, up to
-- export_max_attempts times, then marked failed. Finished archives expire after export_ttl_s.

CREATE TABLE exports (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    requested_by    text NOT NULL,
    format          text NOT NULL CONSTRAINT export_format_known CHECK (format IN ('ndjson', 'csv', 'parquet')),
    widget_id       uuid,  -- no foreign key: the record outlives a deleted widget (its file is withdrawn)
    from_at         timestamptz,
    to_at           timestamptz,
    status          text NOT NULL DEFAULT 'queued'
                    CONSTRAINT export_status_known CHECK (status IN ('queued', 'running', 'done', 'failed', 'expired')),
    attempts        integer NOT NULL DEFAULT 0,
    lease_owner     text,
    lease_until     timestamptz,
    rows_done       bigint NOT NULL DEFAULT 0,  -- progress of the running attempt
    events_count    bigint,
    contacts_count  bigint,
    size_bytes      bigint,
    sha256          text,   -- of the archive
    file_name       text,   -- relative to export_dir
    erasures_seen   bigint, -- the tenant's erased_subjects rows in the export's snapshot
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    expires_at      timestamptz
);
CREATE INDEX exports_tenant ON exports (tenant_id, created_at);
-- What the workers look at: jobs to claim (queued, or running with a lapsed lease) and archives to expire.
CREATE INDEX exports_open ON exports (status, created_at) WHERE status IN ('queued', 'running', 'done');
