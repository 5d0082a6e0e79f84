-- The sink's re-link looks up, for each identify it writes, the visitor's link just before and just after it
-- (sink/writer.py, _RETRO_LINK). Without an index that leads with the visitor, the planner used
-- visitor_events_identify_user (tenant_id, user_id), i.e. read every identify of the tenant per lookup: the
-- re-link grew with the tenant's history (25 of 37 s of the sink's time in the end-to-end benchmark).
CREATE INDEX visitor_events_identify_visitor
    ON visitor_events (tenant_id, visitor_id, widget_id, occurred_at, event_id)
    WHERE event_type = 'identify';
