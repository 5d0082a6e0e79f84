-- Console: tenant members with roles, personal API keys, one-time sign-in links; the audit log gains a
-- request id and becomes append-only.

CREATE TABLE members (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email       text NOT NULL CONSTRAINT email_lowercase CHECK (email = lower(email) AND email <> ''),
    role        text NOT NULL CONSTRAINT role_known CHECK (role IN ('owner', 'admin', 'member')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email)
);

-- The secret is shown once; only its SHA-256 is kept (a 256-bit random secret needs no slow hash).
CREATE TABLE api_keys (
    id             uuid PRIMARY KEY,
    member_id      uuid NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name           text NOT NULL,
    prefix         text NOT NULL,              -- the first characters of the secret, for display
    secret_sha256  bytea NOT NULL UNIQUE CONSTRAINT secret_sha256_len CHECK (length(secret_sha256) = 32),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    last_used_at   timestamptz
);
CREATE INDEX api_keys_member ON api_keys (member_id);

CREATE TABLE login_links (
    token_sha256  bytea PRIMARY KEY CONSTRAINT token_sha256_len CHECK (length(token_sha256) = 32),
    member_id     uuid NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);

ALTER TABLE audit_log ADD COLUMN request_id text;
CREATE INDEX audit_log_tenant_id ON audit_log (tenant_id, id);

-- Append-only: no UPDATE, DELETE or TRUNCATE through any role that is not the table owner disabling it.
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
