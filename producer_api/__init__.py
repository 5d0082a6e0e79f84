"""The ingest API: `POST /api/widget/track` validates widget batches and writes them to Kafka as Avro."""
