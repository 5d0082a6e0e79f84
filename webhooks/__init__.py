"""The `site-activity webhooks` stage: signed visitor_event.created webhooks (issue 13)."""
