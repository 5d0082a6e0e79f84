"""The sink: consumes the event stream and writes it to Postgres, idempotently.

One batch goes through a short chain of steps, commit last (see `sink.pipeline`):
decode -> write (one Postgres transaction) -> dead-letter what can never be written -> commit Kafka offsets.
"""
