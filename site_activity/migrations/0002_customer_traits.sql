-- Trait merge for identify() calls, used by the sink when it upserts customers.
--
-- Traits merge per key by event time: customers.trait_times holds, per trait key, the occurred_at of the value
-- kept. An incoming value wins when its time is >= the stored one (so re-applying the same identify changes
-- nothing), an older one only fills keys that are not there yet. Keys are never removed.

CREATE FUNCTION merge_customer_traits(
    old_traits jsonb, old_times jsonb, new_traits jsonb, new_times jsonb,
    OUT traits jsonb, OUT trait_times jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(k, CASE WHEN take_new THEN new_traits -> k ELSE old_traits -> k END),
                    '{}'::jsonb),
           coalesce(jsonb_object_agg(k, CASE WHEN take_new THEN new_times -> k ELSE old_times -> k END)
                        FILTER (WHERE CASE WHEN take_new THEN new_times -> k ELSE old_times -> k END IS NOT NULL),
                    '{}'::jsonb)
    FROM (
        SELECT k,
               new_traits ? k AND (
                   NOT old_traits ? k
                   OR NOT old_times ? k  -- a value without a recorded time (set by hand) counts as older
                   OR (new_times ->> k)::timestamptz >= (old_times ->> k)::timestamptz) AS take_new
        FROM (SELECT jsonb_object_keys(old_traits) UNION SELECT jsonb_object_keys(new_traits)) AS keys (k)
    ) AS decided
$$;
