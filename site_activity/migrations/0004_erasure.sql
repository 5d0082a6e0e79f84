-- Erasure (GDPR): subjects erased from a tenant, kept only as salted hashes. The sink drops any event of an
-- erased subject before it is stored (sink/writer.py), so events still in Kafka or sent later never land.

-- sha256 of '<tenant id>:<kind>:<subject>'; the tenant id salts it, so a hash says nothing across tenants.
-- Subjects: visitor = '<widget id>:<visitor id>', user = the identify() user id, contact = the customer id.
CREATE FUNCTION erasure_hash(tenant uuid, kind text, subject text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT sha256(convert_to(tenant::text || ':' || kind || ':' || subject, 'UTF8'))
$$;

CREATE TABLE erased_subjects (
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    subject_hash  bytea NOT NULL,
    kind          text NOT NULL CONSTRAINT erased_kind_known CHECK (kind IN ('visitor', 'user', 'contact')),
    erased_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, subject_hash)
);

-- A contact's erase finds the visitors that identified as its user id; identify events are few, so this index
-- is small, and it keeps the erase (which holds the tenant's erase lock, pausing the sink's writes for that
-- tenant) short on a big table.
CREATE INDEX visitor_events_identify_user ON visitor_events (tenant_id, user_id) WHERE event_type = 'identify';
