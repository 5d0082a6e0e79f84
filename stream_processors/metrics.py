"""Prometheus metrics of the processors (served on /metrics by the faust web server)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES_IN = Counter("site_activity_processors_messages_in_total",
                      "Raw messages processed (one per ingest request, or one per event from older producers)")
EVENTS_IN = Counter("site_activity_processors_events_in_total", "Raw events processed (valid ones, all messages)")
EVENTS_OUT = Counter("site_activity_processors_events_out_total",
                     "Records written to the enriched topic (input events plus session_start events)")
SESSION_STARTS = Counter("site_activity_processors_session_starts_total", "session_start events emitted")
IDENTITY_LINKS = Counter("site_activity_processors_identity_links_total", "Links published on the identity-links topic")
DEAD_LETTERS = Counter("site_activity_processors_dead_letters_total",
                       "Dead letters by reason: undecodable raw messages, single invalid events out of a batch message,"
                       " output records the broker can never take", ["reason"])
BATCH_EVENTS = Histogram("site_activity_processors_batch_events", "Valid events per processed take() batch",
                         buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000))
BATCH_SECONDS = Histogram("site_activity_processors_batch_seconds", "Time to process and deliver one batch",
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
INPUT_AGE = Histogram("site_activity_processors_input_age_seconds",
                      "Age of each batch's oldest raw message when the batch starts (now minus its Kafka timestamp):"
                      " how far behind the raw topic the worker is",
                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900))
