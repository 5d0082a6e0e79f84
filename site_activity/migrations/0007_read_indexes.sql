-- Read surfaces (issue 12, events / visitors / timelines): what the REST reads and the console pages need to
-- stay fast on a big visitor_events table (console/reads.py).

-- 1. A commit-ordered feed for GET /api/v1/events?order=received.
-- Every row remembers the id of the transaction that inserted it. A reader only serves rows whose transaction
-- id is below the xmin of its own snapshot: every transaction below xmin has finished, so no row can still
-- commit there later. A polling client that keys on (txid, widget_id, event_id) therefore sees every
-- committed row exactly once, even when several sink transactions commit out of received_at order (a cursor on
-- received_at would skip a row that commits after a row with a later received_at).
-- NOT NULL DEFAULT '0' is a constant default: no table rewrite; rows older than this migration sort first.
-- Then the default becomes the inserting transaction's id (new rows only; the sink's INSERT lists its columns,
-- so it needs no change).
ALTER TABLE visitor_events ADD COLUMN txid xid8 NOT NULL DEFAULT '0';
ALTER TABLE visitor_events ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
CREATE INDEX visitor_events_tenant_txid ON visitor_events (tenant_id, txid, widget_id, event_id);

-- 2. The visitor browser: one summary row per (widget, visitor), kept exact by statement-level triggers on
-- visitor_events, so a page of visitors is an index range scan instead of an aggregate over the widget's events.
--   events, pageviews, custom_events, sessions (= session_start rows: the sessions the visitor started)
--   first_seen / last_seen: min / max occurred_at
--   user_id / customer_id: those of the visitor's latest identify on this widget (by occurred_at, event_id),
--   the same "link in force" rule as the sink's re-link.
CREATE TABLE visitor_summaries (
    widget_id         uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    visitor_id        text NOT NULL,
    tenant_id         uuid NOT NULL,
    first_seen        timestamptz NOT NULL,
    last_seen         timestamptz NOT NULL,
    events            bigint NOT NULL,
    pageviews         bigint NOT NULL,
    sessions          bigint NOT NULL,
    custom_events     bigint NOT NULL,
    user_id           text,
    customer_id       uuid REFERENCES customers (id) ON DELETE SET NULL,
    identified_at     timestamptz,
    identify_event_id uuid,
    PRIMARY KEY (widget_id, visitor_id)
);
CREATE INDEX visitor_summaries_widget_recent ON visitor_summaries (widget_id, last_seen, visitor_id);
CREATE INDEX visitor_summaries_customer ON visitor_summaries (customer_id) WHERE customer_id IS NOT NULL;

-- Inserts add their counts (the transition table holds only the rows really inserted, so ON CONFLICT DO NOTHING
-- duplicates count nothing). Rows are upserted in key order, so concurrent sink transactions lock summaries in
-- one order and cannot deadlock on them.
CREATE FUNCTION visitor_summaries_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO visitor_summaries AS s (widget_id, visitor_id, tenant_id, first_seen, last_seen, events, pageviews,
                                        sessions, custom_events, user_id, customer_id, identified_at, identify_event_id)
    SELECT a.widget_id, a.visitor_id, a.tenant_id, a.first_seen, a.last_seen, a.events, a.pageviews, a.sessions,
           a.custom_events, i.user_id, i.customer_id, i.occurred_at, i.event_id
    FROM (SELECT n.widget_id, n.visitor_id, any_value(n.tenant_id) AS tenant_id, min(n.occurred_at) AS first_seen,
                 max(n.occurred_at) AS last_seen, count(*) AS events,
                 count(*) FILTER (WHERE n.event_type = 'pageview') AS pageviews,
                 count(*) FILTER (WHERE n.event_type = 'session_start') AS sessions,
                 count(*) FILTER (WHERE n.event_type = 'custom') AS custom_events
          FROM new_rows n GROUP BY n.widget_id, n.visitor_id) a
    LEFT JOIN (  -- identifies are few: the latest per visitor, found without sorting every group
        SELECT DISTINCT ON (n.widget_id, n.visitor_id) n.widget_id, n.visitor_id, n.user_id, n.customer_id,
               n.occurred_at, n.event_id
        FROM new_rows n WHERE n.event_type = 'identify'
        ORDER BY n.widget_id, n.visitor_id, n.occurred_at DESC, n.event_id DESC) i
        ON i.widget_id = a.widget_id AND i.visitor_id = a.visitor_id
    ORDER BY a.widget_id, a.visitor_id
    ON CONFLICT (widget_id, visitor_id) DO UPDATE SET
        first_seen = least(s.first_seen, EXCLUDED.first_seen),
        last_seen = greatest(s.last_seen, EXCLUDED.last_seen),
        events = s.events + EXCLUDED.events,
        pageviews = s.pageviews + EXCLUDED.pageviews,
        sessions = s.sessions + EXCLUDED.sessions,
        custom_events = s.custom_events + EXCLUDED.custom_events,
        (user_id, customer_id, identified_at, identify_event_id) = (
            SELECT CASE WHEN newer THEN EXCLUDED.user_id ELSE s.user_id END,
                   CASE WHEN newer THEN EXCLUDED.customer_id ELSE s.customer_id END,
                   CASE WHEN newer THEN EXCLUDED.identified_at ELSE s.identified_at END,
                   CASE WHEN newer THEN EXCLUDED.identify_event_id ELSE s.identify_event_id END
            FROM (SELECT EXCLUDED.identified_at IS NOT NULL AND (s.identified_at IS NULL
                         OR (EXCLUDED.identified_at, EXCLUDED.identify_event_id) > (s.identified_at, s.identify_event_id))
                  AS newer) d);
    RETURN NULL;
END
$$;

-- Deletes (retention purge, erasure, a deleted widget's cascade) subtract the deleted rows' counts; a visitor left
-- with no rows loses its summary. Only what a count cannot give is read back, through indexes and only when the
-- deleted rows held it: first_seen when the oldest row went (a purge: always), last_seen when the newest went,
-- the latest identify when that identify went. So a purge batch costs about its own rows, not the history of
-- every visitor it touches. The deleted rows were all committed, so all were counted by the insert trigger.
-- The summaries are locked first, in key order, in their own statement: a sink transaction that already added
-- rows for such a visitor holds that lock until it commits, so the reads below (later statements, newer
-- snapshots in READ COMMITTED) see its rows; one that adds rows later waits for this lock and adds its counts on
-- top. Either way the summary stays equal to the rows.
CREATE FUNCTION visitor_summaries_subtract() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM visitor_summaries s JOIN (SELECT DISTINCT widget_id, visitor_id FROM old_rows) t
        USING (widget_id, visitor_id)
    ORDER BY s.widget_id, s.visitor_id FOR UPDATE OF s;
    DELETE FROM visitor_summaries s USING (SELECT widget_id, visitor_id, count(*) AS events FROM old_rows
                                           GROUP BY widget_id, visitor_id) d
    WHERE s.widget_id = d.widget_id AND s.visitor_id = d.visitor_id AND s.events <= d.events;
    UPDATE visitor_summaries s SET
        events = s.events - d.events, pageviews = s.pageviews - d.pageviews, sessions = s.sessions - d.sessions,
        custom_events = s.custom_events - d.custom_events,
        first_seen = CASE WHEN d.oldest <= s.first_seen THEN (
            SELECT min(e.occurred_at) FROM visitor_events e
            WHERE e.tenant_id = s.tenant_id AND e.visitor_id = s.visitor_id AND e.widget_id = s.widget_id)
            ELSE s.first_seen END,
        last_seen = CASE WHEN d.newest >= s.last_seen THEN (
            SELECT max(e.occurred_at) FROM visitor_events e
            WHERE e.tenant_id = s.tenant_id AND e.visitor_id = s.visitor_id AND e.widget_id = s.widget_id)
            ELSE s.last_seen END,
        (user_id, customer_id, identified_at, identify_event_id) = (
            SELECT CASE WHEN gone THEN i.user_id ELSE s.user_id END,
                   CASE WHEN gone THEN i.customer_id ELSE s.customer_id END,
                   CASE WHEN gone THEN i.occurred_at ELSE s.identified_at END,
                   CASE WHEN gone THEN i.event_id ELSE s.identify_event_id END
            FROM (SELECT s.identify_event_id = ANY(coalesce(d.identifies, '{}')) AS gone) g
            LEFT JOIN LATERAL (  -- the latest identify left (visitor_events_identify_visitor, migration 0005)
                SELECT e.user_id, e.customer_id, e.occurred_at, e.event_id FROM visitor_events e
                WHERE g.gone AND e.tenant_id = s.tenant_id AND e.visitor_id = s.visitor_id
                  AND e.widget_id = s.widget_id AND e.event_type = 'identify'
                ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT 1) i ON true)
    FROM (SELECT widget_id, visitor_id, count(*) AS events, count(*) FILTER (WHERE event_type = 'pageview') AS pageviews,
                 count(*) FILTER (WHERE event_type = 'session_start') AS sessions,
                 count(*) FILTER (WHERE event_type = 'custom') AS custom_events,
                 min(occurred_at) AS oldest, max(occurred_at) AS newest,
                 array_agg(event_id) FILTER (WHERE event_type = 'identify') AS identifies
          FROM old_rows GROUP BY widget_id, visitor_id) d
    WHERE s.widget_id = d.widget_id AND s.visitor_id = d.visitor_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER visitor_summaries_on_insert AFTER INSERT ON visitor_events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION visitor_summaries_add();
CREATE TRIGGER visitor_summaries_on_delete AFTER DELETE ON visitor_events
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION visitor_summaries_subtract();

-- Rows already stored.
INSERT INTO visitor_summaries (widget_id, visitor_id, tenant_id, first_seen, last_seen, events, pageviews, sessions,
                               custom_events, user_id, customer_id, identified_at, identify_event_id)
SELECT e.widget_id, e.visitor_id, min(e.tenant_id::text)::uuid, min(e.occurred_at), max(e.occurred_at), count(*),
       count(*) FILTER (WHERE e.event_type = 'pageview'),
       count(*) FILTER (WHERE e.event_type = 'session_start'),
       count(*) FILTER (WHERE e.event_type = 'custom'),
       (array_agg(e.user_id ORDER BY e.occurred_at DESC, e.event_id DESC) FILTER (WHERE e.event_type = 'identify'))[1],
       (array_agg(e.customer_id ORDER BY e.occurred_at DESC, e.event_id DESC) FILTER (WHERE e.event_type = 'identify'))[1],
       max(e.occurred_at) FILTER (WHERE e.event_type = 'identify'),
       (array_agg(e.event_id ORDER BY e.occurred_at DESC, e.event_id DESC) FILTER (WHERE e.event_type = 'identify'))[1]
FROM visitor_events e
GROUP BY e.widget_id, e.visitor_id;
