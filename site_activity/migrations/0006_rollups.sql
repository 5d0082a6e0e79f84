-- Rollups (read surfaces, issue 12): per widget, per UTC hour / UTC day counts that the dashboard and the
-- /api/v1/stats endpoints read instead of scanning visitor_events.
--
-- EXACT: statement-level AFTER INSERT / AFTER DELETE triggers with transition tables keep them equal to the
-- same counts over visitor_events at every commit. The transition table holds exactly the rows the statement
-- really inserted or deleted: a duplicate the sink's INSERT ... ON CONFLICT DO NOTHING skips is not in it, and
-- every DELETE is covered whoever runs it (the sink's batch, the retention purge, an erasure, a widget or
-- tenant deletion cascading to its events, COPY, a hand-run statement). The triggers run inside the statement's
-- transaction, so the counts commit or roll back with the rows.
--
-- Lock order: every trigger locks rollup rows table by table in one fixed order (visitor hours, hourly,
-- visitor days, daily, pages, daily pages, event names) and within a table in key order (INSERT ... ORDER BY key, or
-- SELECT ... ORDER BY key FOR UPDATE before an UPDATE), so concurrent sink members and purges cannot deadlock
-- on rollup rows.
--
-- Switch: `SET site_activity.rollups = off` (the sink's `sink_rollups=false` sets it on its connection) makes
-- the triggers skip their work for that session; rollups are then stale until `site-activity rollups rebuild`.

-- A "page" is the URL's path: scheme, host, query and fragment dropped, as Plausible's event:page. A URL
-- without a path is '/'; a pageview without a URL counts under '(none)'.
CREATE FUNCTION rollup_page(url text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN url IS NULL THEN '(none)' ELSE coalesce(nullif(
        (regexp_match(url, '^(?:[A-Za-z][A-Za-z0-9+.-]*:)?(?://[^/?#]*)?([^?#]*)'))[1], ''), '/') END
$$;

CREATE FUNCTION rollups_on() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('site_activity.rollups', true), '') <> 'off'
$$;

-- Totals per widget and UTC hour. visitors = distinct visitor ids with any event in that hour (= the rows
-- of rollup_visitor_hours for it, kept as a counter so a read does not count sets).
CREATE TABLE rollup_hourly (
    widget_id      uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    hour           timestamptz NOT NULL,
    events         bigint NOT NULL,
    pageviews      bigint NOT NULL,
    sessions       bigint NOT NULL,  -- session_start rows
    custom_events  bigint NOT NULL,
    identifies     bigint NOT NULL,
    visitors       bigint NOT NULL,
    PRIMARY KEY (widget_id, hour)
);

-- Distinct visitors per widget and UTC day (from rollup_visitor_days).
CREATE TABLE rollup_daily (
    widget_id  uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    day        date NOT NULL,
    visitors   bigint NOT NULL,
    PRIMARY KEY (widget_id, day)
);

-- The visitor sets behind the unique counts: one row per (bucket, visitor) with its number of events, so a
-- delete decrements and the row goes when it reaches zero. vh is a 64-bit hash of the visitor id. A range's
-- unique visitors: count(DISTINCT visitor_id) over these rows when the range holds few of them (exact), else
-- the k-minimum-values estimate over vh through the (widget_id, vh, bucket) index (console/stats.py).
CREATE TABLE rollup_visitor_hours (
    widget_id   uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    hour        timestamptz NOT NULL,
    visitor_id  text NOT NULL,
    vh          bigint NOT NULL,
    events      bigint NOT NULL,
    PRIMARY KEY (widget_id, hour, visitor_id)
);
CREATE INDEX rollup_visitor_hours_hash ON rollup_visitor_hours (widget_id, vh, hour);
CREATE TABLE rollup_visitor_days (
    widget_id   uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    day         date NOT NULL,
    visitor_id  text NOT NULL,
    vh          bigint NOT NULL,
    events      bigint NOT NULL,
    PRIMARY KEY (widget_id, day, visitor_id)
);
CREATE INDEX rollup_visitor_days_hash ON rollup_visitor_days (widget_id, vh, day);

CREATE TABLE rollup_pages (
    widget_id  uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    hour       timestamptz NOT NULL,
    page       text NOT NULL,
    pageviews  bigint NOT NULL,
    PRIMARY KEY (widget_id, hour, page)
);

-- The same per UTC day: a month's top pages read ~30 rows per page instead of ~720 (pages are many).
CREATE TABLE rollup_pages_daily (
    widget_id  uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    day        date NOT NULL,
    page       text NOT NULL,
    pageviews  bigint NOT NULL,
    PRIMARY KEY (widget_id, day, page)
);

CREATE TABLE rollup_event_names (
    widget_id  uuid NOT NULL REFERENCES widget_configs (id) ON DELETE CASCADE,
    hour       timestamptz NOT NULL,
    name       text NOT NULL,
    events     bigint NOT NULL,
    PRIMARY KEY (widget_id, hour, name)
);

-- Hours and days are UTC whatever the session's TimeZone: date_trunc(..., 'UTC') and AT TIME ZONE 'UTC'.

-- One statement per inserting statement (a sink batch): new_rows is scanned twice (per visitor and hour; per URL
-- and hour for pageviews, so rollup_page runs once per distinct URL, not per row) plus once for custom event
-- names, and every rollup table is upserted from those aggregates. The main query pulls the upserts one by one
-- in the fixed lock order, each in key order.
CREATE FUNCTION rollups_add() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hours_n bigint; days_n bigint; pages_n bigint; page_days_n bigint; names_n bigint;  -- rows upserted
BEGIN
    IF NOT rollups_on() THEN
        RETURN NULL;
    END IF;
    WITH vis AS MATERIALIZED (
        SELECT widget_id, date_trunc('hour', occurred_at, 'UTC') AS hour, visitor_id, count(*) AS events,
               count(*) FILTER (WHERE event_type = 'pageview') AS pageviews,
               count(*) FILTER (WHERE event_type = 'session_start') AS sessions,
               count(*) FILTER (WHERE event_type = 'custom') AS custom_events,
               count(*) FILTER (WHERE event_type = 'identify') AS identifies
        FROM new_rows GROUP BY 1, 2, 3
    ), vh AS (
        -- xmax = 0 marks a row the upsert inserted (an updated one carries the updater's xid); this stays right
        -- when a concurrent transaction created the same row first (we wait for it and update instead).
        INSERT INTO rollup_visitor_hours AS r (widget_id, hour, visitor_id, vh, events)
        SELECT widget_id, hour, visitor_id, hashtextextended(visitor_id, 0), events FROM vis ORDER BY 1, 2, 3
        ON CONFLICT (widget_id, hour, visitor_id) DO UPDATE SET events = r.events + excluded.events
        RETURNING r.widget_id, r.hour, (r.xmax = 0) AS fresh
    ), fresh_hours AS (
        SELECT widget_id, hour, count(*) FILTER (WHERE fresh) AS n FROM vh GROUP BY 1, 2
    ), hourly AS (
        INSERT INTO rollup_hourly AS r (widget_id, hour, events, pageviews, sessions, custom_events, identifies, visitors)
        SELECT e.widget_id, e.hour, e.events, e.pageviews, e.sessions, e.custom_events, e.identifies, coalesce(f.n, 0)
        FROM (SELECT widget_id, hour, sum(events) AS events, sum(pageviews) AS pageviews, sum(sessions) AS sessions,
                     sum(custom_events) AS custom_events, sum(identifies) AS identifies
              FROM vis GROUP BY 1, 2) e
        LEFT JOIN fresh_hours f USING (widget_id, hour) ORDER BY 1, 2
        ON CONFLICT (widget_id, hour) DO UPDATE SET
            events = r.events + excluded.events, pageviews = r.pageviews + excluded.pageviews,
            sessions = r.sessions + excluded.sessions, custom_events = r.custom_events + excluded.custom_events,
            identifies = r.identifies + excluded.identifies, visitors = r.visitors + excluded.visitors
        RETURNING 1
    ), vd AS (
        INSERT INTO rollup_visitor_days AS r (widget_id, day, visitor_id, vh, events)
        SELECT widget_id, (hour AT TIME ZONE 'UTC')::date, visitor_id, hashtextextended(visitor_id, 0), sum(events)
        FROM vis GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (widget_id, day, visitor_id) DO UPDATE SET events = r.events + excluded.events
        RETURNING r.widget_id, r.day, (r.xmax = 0) AS fresh
    ), daily AS (
        INSERT INTO rollup_daily AS r (widget_id, day, visitors)
        SELECT widget_id, day, count(*) FILTER (WHERE fresh) FROM vd GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (widget_id, day) DO UPDATE SET visitors = r.visitors + excluded.visitors
        RETURNING 1
    ), urls AS MATERIALIZED (
        SELECT widget_id, date_trunc('hour', occurred_at, 'UTC') AS hour, url, count(*) AS n
        FROM new_rows WHERE event_type = 'pageview' GROUP BY 1, 2, 3
    ), pages AS MATERIALIZED (
        SELECT widget_id, hour, rollup_page(url) AS page, sum(n) AS n FROM urls GROUP BY 1, 2, 3
    ), ph AS (
        INSERT INTO rollup_pages AS r (widget_id, hour, page, pageviews)
        SELECT widget_id, hour, page, n FROM pages ORDER BY 1, 2, 3
        ON CONFLICT (widget_id, hour, page) DO UPDATE SET pageviews = r.pageviews + excluded.pageviews
        RETURNING 1
    ), pd AS (
        INSERT INTO rollup_pages_daily AS r (widget_id, day, page, pageviews)
        SELECT widget_id, (hour AT TIME ZONE 'UTC')::date, page, sum(n) FROM pages GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (widget_id, day, page) DO UPDATE SET pageviews = r.pageviews + excluded.pageviews
        RETURNING 1
    ), names AS (
        INSERT INTO rollup_event_names AS r (widget_id, hour, name, events)
        SELECT widget_id, date_trunc('hour', occurred_at, 'UTC'), coalesce(name, ''), count(*)
        FROM new_rows WHERE event_type = 'custom' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (widget_id, hour, name) DO UPDATE SET events = r.events + excluded.events
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM hourly), (SELECT count(*) FROM daily), (SELECT count(*) FROM ph),
           (SELECT count(*) FROM pd), (SELECT count(*) FROM names)
    INTO hours_n, days_n, pages_n, page_days_n, names_n;
    RETURN NULL;
END
$$;

-- Deletes only ever UPDATE or DELETE existing rollup rows (never insert): when a widget's rollups were already
-- removed by its own cascade, the decrement finds nothing, in whichever order the cascades run. Rows whose
-- count reaches zero are deleted, so a rollup row exists exactly while events back it. One statement, like
-- rollups_add: old_rows is aggregated per visitor-hour and per URL-hour (and for custom event names) once; each
-- table's rows are locked in key order (SELECT ... ORDER BY key FOR UPDATE), then updated or deleted, table by
-- table in the fixed lock order (the main query pulls them in that order).
CREATE FUNCTION rollups_remove() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    touched bigint[];  -- rows updated / deleted per step
BEGIN
    IF NOT rollups_on() THEN
        RETURN NULL;
    END IF;
    WITH vis AS MATERIALIZED (
        SELECT widget_id, date_trunc('hour', occurred_at, 'UTC') AS hour, visitor_id, count(*) AS n,
               count(*) FILTER (WHERE event_type = 'pageview') AS pageviews,
               count(*) FILTER (WHERE event_type = 'session_start') AS sessions,
               count(*) FILTER (WHERE event_type = 'custom') AS custom_events,
               count(*) FILTER (WHERE event_type = 'identify') AS identifies
        FROM old_rows GROUP BY 1, 2, 3
    ), l_vh AS (
        SELECT r.widget_id, r.hour, r.visitor_id, r.events - d.n AS remaining
        FROM rollup_visitor_hours r JOIN vis d USING (widget_id, hour, visitor_id) ORDER BY 1, 2, 3 FOR UPDATE OF r
    ), u_vh AS (
        UPDATE rollup_visitor_hours r SET events = l.remaining FROM l_vh l
        WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND r.visitor_id = l.visitor_id AND l.remaining > 0 RETURNING 1
    ), x_vh AS (
        DELETE FROM rollup_visitor_hours r USING l_vh l
        WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND r.visitor_id = l.visitor_id AND l.remaining <= 0 RETURNING r.widget_id, r.hour
    ), gone_hours AS (
        SELECT widget_id, hour, count(*) AS n FROM x_vh GROUP BY 1, 2
    ), e AS (
        SELECT widget_id, hour, sum(n) AS events, sum(pageviews) AS pageviews, sum(sessions) AS sessions,
               sum(custom_events) AS custom_events, sum(identifies) AS identifies
        FROM vis GROUP BY 1, 2
    ), l_h AS (
        SELECT r.widget_id, r.hour, r.events - e.events AS events, r.pageviews - e.pageviews AS pageviews,
               r.sessions - e.sessions AS sessions, r.custom_events - e.custom_events AS custom_events,
               r.identifies - e.identifies AS identifies, r.visitors - coalesce(g.n, 0) AS visitors
        FROM rollup_hourly r JOIN e USING (widget_id, hour) LEFT JOIN gone_hours g USING (widget_id, hour)
        ORDER BY 1, 2 FOR UPDATE OF r
    ), u_h AS (
        UPDATE rollup_hourly r SET events = l.events, pageviews = l.pageviews, sessions = l.sessions,
                                   custom_events = l.custom_events, identifies = l.identifies, visitors = l.visitors
        FROM l_h l WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND l.events > 0 RETURNING 1
    ), x_h AS (
        DELETE FROM rollup_hourly r USING l_h l
        WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND l.events <= 0
        RETURNING 1
    ), vdays AS (
        SELECT widget_id, (hour AT TIME ZONE 'UTC')::date AS day, visitor_id, sum(n) AS n FROM vis GROUP BY 1, 2, 3
    ), l_vd AS (
        SELECT r.widget_id, r.day, r.visitor_id, r.events - d.n AS remaining
        FROM rollup_visitor_days r JOIN vdays d USING (widget_id, day, visitor_id) ORDER BY 1, 2, 3 FOR UPDATE OF r
    ), u_vd AS (
        UPDATE rollup_visitor_days r SET events = l.remaining FROM l_vd l
        WHERE r.widget_id = l.widget_id AND r.day = l.day AND r.visitor_id = l.visitor_id AND l.remaining > 0 RETURNING 1
    ), x_vd AS (
        DELETE FROM rollup_visitor_days r USING l_vd l
        WHERE r.widget_id = l.widget_id AND r.day = l.day AND r.visitor_id = l.visitor_id AND l.remaining <= 0 RETURNING r.widget_id, r.day
    ), gone_days AS (
        SELECT widget_id, day, count(*) AS n FROM x_vd GROUP BY 1, 2
    ), l_d AS (
        SELECT r.widget_id, r.day, r.visitors - d.n AS remaining
        FROM rollup_daily r JOIN gone_days d USING (widget_id, day) ORDER BY 1, 2 FOR UPDATE OF r
    ), u_d AS (
        UPDATE rollup_daily r SET visitors = l.remaining FROM l_d l
        WHERE r.widget_id = l.widget_id AND r.day = l.day AND l.remaining > 0 RETURNING 1
    ), x_d AS (
        DELETE FROM rollup_daily r USING l_d l
        WHERE r.widget_id = l.widget_id AND r.day = l.day AND l.remaining <= 0 RETURNING r.widget_id, r.day
    ), urls AS MATERIALIZED (
        SELECT widget_id, date_trunc('hour', occurred_at, 'UTC') AS hour, url, count(*) AS n
        FROM old_rows WHERE event_type = 'pageview' GROUP BY 1, 2, 3
    ), pages AS MATERIALIZED (
        SELECT widget_id, hour, rollup_page(url) AS page, sum(n) AS n FROM urls GROUP BY 1, 2, 3
    ), l_p AS (
        SELECT r.widget_id, r.hour, r.page, r.pageviews - d.n AS remaining
        FROM rollup_pages r JOIN pages d USING (widget_id, hour, page) ORDER BY 1, 2, 3 FOR UPDATE OF r
    ), u_p AS (
        UPDATE rollup_pages r SET pageviews = l.remaining FROM l_p l
        WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND r.page = l.page AND l.remaining > 0 RETURNING 1
    ), x_p AS (
        DELETE FROM rollup_pages r USING l_p l
        WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND r.page = l.page AND l.remaining <= 0 RETURNING r.widget_id, r.hour
    ), page_days AS (
        SELECT widget_id, (hour AT TIME ZONE 'UTC')::date AS day, page, sum(n) AS n FROM pages GROUP BY 1, 2, 3
    ), l_pd AS (
        SELECT r.widget_id, r.day, r.page, r.pageviews - d.n AS remaining
        FROM rollup_pages_daily r JOIN page_days d USING (widget_id, day, page) ORDER BY 1, 2, 3 FOR UPDATE OF r
    ), u_pd AS (
        UPDATE rollup_pages_daily r SET pageviews = l.remaining FROM l_pd l
        WHERE r.widget_id = l.widget_id AND r.day = l.day AND r.page = l.page AND l.remaining > 0 RETURNING 1
    ), x_pd AS (
        DELETE FROM rollup_pages_daily r USING l_pd l
        WHERE r.widget_id = l.widget_id AND r.day = l.day AND r.page = l.page AND l.remaining <= 0 RETURNING r.widget_id, r.day
    ), custom AS (
        SELECT widget_id, date_trunc('hour', occurred_at, 'UTC') AS hour, coalesce(name, '') AS name, count(*) AS n
        FROM old_rows WHERE event_type = 'custom' GROUP BY 1, 2, 3
    ), l_n AS (
        SELECT r.widget_id, r.hour, r.name, r.events - d.n AS remaining
        FROM rollup_event_names r JOIN custom d USING (widget_id, hour, name) ORDER BY 1, 2, 3 FOR UPDATE OF r
    ), u_n AS (
        UPDATE rollup_event_names r SET events = l.remaining FROM l_n l
        WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND r.name = l.name AND l.remaining > 0 RETURNING 1
    ), x_n AS (
        DELETE FROM rollup_event_names r USING l_n l
        WHERE r.widget_id = l.widget_id AND r.hour = l.hour AND r.name = l.name AND l.remaining <= 0 RETURNING r.widget_id, r.hour
    )
    SELECT ARRAY[(SELECT count(*) FROM u_vh), (SELECT count(*) FROM x_vh), (SELECT count(*) FROM u_h),
                 (SELECT count(*) FROM x_h), (SELECT count(*) FROM u_vd), (SELECT count(*) FROM x_vd),
                 (SELECT count(*) FROM u_d), (SELECT count(*) FROM x_d), (SELECT count(*) FROM u_p),
                 (SELECT count(*) FROM x_p), (SELECT count(*) FROM u_pd), (SELECT count(*) FROM x_pd),
                 (SELECT count(*) FROM u_n), (SELECT count(*) FROM x_n)]
    INTO touched;
    RETURN NULL;
END
$$;

-- TRUNCATE visitor_events (benchmarks, a reset) empties the rollups with it.
CREATE FUNCTION rollups_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE rollup_hourly, rollup_daily, rollup_visitor_hours, rollup_visitor_days, rollup_pages, rollup_pages_daily,
             rollup_event_names;
    RETURN NULL;
END
$$;

-- The counted columns never change after insert (the sink's re-link only sets customer_id); refusing such an
-- UPDATE keeps the rollups exact without an UPDATE trigger on the hot re-link path.
CREATE FUNCTION rollups_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'visitor_events: widget_id, visitor_id, event_type, name, url and occurred_at are immutable (rollups count them)'
        USING ERRCODE = 'feature_not_supported';
END
$$;

CREATE TRIGGER visitor_events_rollups_insert AFTER INSERT ON visitor_events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rollups_add();
CREATE TRIGGER visitor_events_rollups_delete AFTER DELETE ON visitor_events
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION rollups_remove();
CREATE TRIGGER visitor_events_rollups_truncate AFTER TRUNCATE ON visitor_events
    FOR EACH STATEMENT EXECUTE FUNCTION rollups_truncate();
CREATE TRIGGER visitor_events_rollups_immutable BEFORE UPDATE OF widget_id, visitor_id, event_type, name, url, occurred_at
    ON visitor_events FOR EACH ROW
    WHEN (OLD.widget_id IS DISTINCT FROM NEW.widget_id OR OLD.visitor_id IS DISTINCT FROM NEW.visitor_id
          OR OLD.event_type IS DISTINCT FROM NEW.event_type OR OLD.name IS DISTINCT FROM NEW.name
          OR OLD.url IS DISTINCT FROM NEW.url OR OLD.occurred_at IS DISTINCT FROM NEW.occurred_at)
    EXECUTE FUNCTION rollups_refuse_update();

-- The repair (`site-activity rollups rebuild [--widget W]`), the backfill below and the benchmark's seeding:
-- recompute a widget's rollups (NULL: every widget's) from visitor_events. SHARE mode blocks writers to
-- visitor_events (the sink waits) until the caller commits, so the result is exact. Returns the events counted.
CREATE FUNCTION rollups_rebuild(p_widget uuid DEFAULT NULL) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    counted bigint;
BEGIN
    LOCK TABLE visitor_events IN SHARE MODE;
    DELETE FROM rollup_hourly WHERE p_widget IS NULL OR widget_id = p_widget;
    DELETE FROM rollup_daily WHERE p_widget IS NULL OR widget_id = p_widget;
    DELETE FROM rollup_visitor_hours WHERE p_widget IS NULL OR widget_id = p_widget;
    DELETE FROM rollup_visitor_days WHERE p_widget IS NULL OR widget_id = p_widget;
    DELETE FROM rollup_pages WHERE p_widget IS NULL OR widget_id = p_widget;
    DELETE FROM rollup_pages_daily WHERE p_widget IS NULL OR widget_id = p_widget;
    DELETE FROM rollup_event_names WHERE p_widget IS NULL OR widget_id = p_widget;

    INSERT INTO rollup_visitor_hours (widget_id, hour, visitor_id, vh, events)
    SELECT widget_id, date_trunc('hour', occurred_at, 'UTC'), visitor_id, hashtextextended(visitor_id, 0), count(*)
    FROM visitor_events WHERE p_widget IS NULL OR widget_id = p_widget GROUP BY 1, 2, 3;
    INSERT INTO rollup_hourly (widget_id, hour, events, pageviews, sessions, custom_events, identifies, visitors)
    SELECT e.widget_id, e.hour, e.events, e.pageviews, e.sessions, e.custom_events, e.identifies, v.visitors
    FROM (SELECT widget_id, date_trunc('hour', occurred_at, 'UTC') AS hour, count(*) AS events,
                 count(*) FILTER (WHERE event_type = 'pageview') AS pageviews,
                 count(*) FILTER (WHERE event_type = 'session_start') AS sessions,
                 count(*) FILTER (WHERE event_type = 'custom') AS custom_events,
                 count(*) FILTER (WHERE event_type = 'identify') AS identifies
          FROM visitor_events WHERE p_widget IS NULL OR widget_id = p_widget GROUP BY 1, 2) e
    JOIN (SELECT widget_id, hour, count(*) AS visitors FROM rollup_visitor_hours
          WHERE p_widget IS NULL OR widget_id = p_widget GROUP BY 1, 2) v USING (widget_id, hour);

    INSERT INTO rollup_visitor_days (widget_id, day, visitor_id, vh, events)
    SELECT widget_id, (occurred_at AT TIME ZONE 'UTC')::date, visitor_id, hashtextextended(visitor_id, 0), count(*)
    FROM visitor_events WHERE p_widget IS NULL OR widget_id = p_widget GROUP BY 1, 2, 3;
    INSERT INTO rollup_daily (widget_id, day, visitors)
    SELECT widget_id, day, count(*) FROM rollup_visitor_days WHERE p_widget IS NULL OR widget_id = p_widget
    GROUP BY 1, 2;

    INSERT INTO rollup_pages (widget_id, hour, page, pageviews)
    SELECT widget_id, date_trunc('hour', occurred_at, 'UTC'), rollup_page(url), count(*)
    FROM visitor_events WHERE (p_widget IS NULL OR widget_id = p_widget) AND event_type = 'pageview'
    GROUP BY 1, 2, 3;
    INSERT INTO rollup_pages_daily (widget_id, day, page, pageviews)
    SELECT widget_id, (hour AT TIME ZONE 'UTC')::date, page, sum(pageviews)
    FROM rollup_pages WHERE p_widget IS NULL OR widget_id = p_widget GROUP BY 1, 2, 3;
    INSERT INTO rollup_event_names (widget_id, hour, name, events)
    SELECT widget_id, date_trunc('hour', occurred_at, 'UTC'), coalesce(name, ''), count(*)
    FROM visitor_events WHERE (p_widget IS NULL OR widget_id = p_widget) AND event_type = 'custom'
    GROUP BY 1, 2, 3;

    SELECT coalesce(sum(events), 0) INTO counted FROM rollup_hourly WHERE p_widget IS NULL OR widget_id = p_widget;
    RETURN counted;
END
$$;

SELECT rollups_rebuild(NULL);
