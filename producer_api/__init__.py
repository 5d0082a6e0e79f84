"""The ingest API: `POST /api/widget/track` validates widget requests (their events) and writes them to Kafka as Avro."""
