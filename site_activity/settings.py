"""The one typed settings object. Every stage reads its configuration from here (env prefix SITE_ACTIVITY_)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

log = logging.getLogger(__name__)
ENV_PREFIX = "SITE_ACTIVITY_"

# --- structure (issue 10) ---------------------------------------------------------------------------------
Stage = Literal["api", "processors", "sink", "webhooks", "console"]
# The setting naming the port each long-running stage serves /healthz (and /metrics, /readyz) on, at http_host.
STAGE_HTTP_PORT: dict[str, str] = {
    "api": "http_port",
    "processors": "processors_web_port",
    "sink": "sink_http_port",
    "webhooks": "webhooks_http_port",
    "console": "console_port",
}


# --- one name per batch concept (issue 10): renamed settings -------------------------------------------------
# Old name -> (new name, old value -> new value). The old environment variables (SITE_ACTIVITY_<OLD>) keep
# working, with a deprecation warning in the log; when both are set the new one wins. ARCHITECTURE.md, "Terms".
def _ms_to_s(value: Any) -> float:
    return float(value) / 1000


RENAMED_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "max_events_per_batch": ("max_events_per_request", lambda v: v),
    "sink_batch_max_ms": ("sink_batch_max_s", _ms_to_s),  # the batch time bounds are all in seconds now
    "processors_producer_batch_bytes": ("processors_producer_batch_size", lambda v: v),
    "purge_batch_rows": ("purge_chunk_rows", lambda v: v),
}


class _RenamedEnv(PydanticBaseSettingsSource):
    """The old environment variables of RENAMED_SETTINGS, under their old names (`Settings._renamed` maps them).
    A plain `validation_alias=AliasChoices(new, old)` would not do: pydantic-settings hands the value on under
    the first alias whichever matched (so the old name could not be warned about), and the sink's time bound
    changed unit. Case-insensitive, like the env source (case_sensitive is off)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the old names directly

    def __call__(self) -> dict[str, Any]:
        env = {name.upper(): value for name, value in os.environ.items()}
        return {old: env[ENV_PREFIX + old.upper()] for old in RENAMED_SETTINGS if ENV_PREFIX + old.upper() in env}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Path(".site-activity")
    # Unset means "the embedded stack": `dev` starts a broker / Postgres and fills these in.
    kafka_bootstrap: str = "127.0.0.1:9092"
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5433/site_activity"
    # The embedded broker: "kafka" (Apache Kafka, KRaft, needs Java 17+) or "tansu" (a pip wheel). Unset:
    # "kafka" where Java 17+ is found, else "tansu" (dev_stack.kafka_dist.broker_kind).
    embedded_broker: Literal["kafka", "tansu"] | None = None
    # Apache Kafka nodes of the embedded cluster (combined broker+controller). Node i listens on
    # embedded_kafka_port + 2*i and its KRaft controller on the port after it, or on
    # embedded_kafka_controller_port + i when that is set (a port next to a free one need not be free).
    embedded_kafka_nodes: int = 1
    embedded_kafka_port: int = 9092
    embedded_kafka_controller_port: int | None = None
    embedded_postgres_port: int = 5433
    kafka_version: str = "4.1.1"
    # Where fetched Kafka jars live (<dir>/<version>/libs); unset: <data_dir>/kafka.
    kafka_dist_dir: Path | None = None

    # --- HTTP ----------------------------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    demo_port: int = 8001
    # Origins allowed to POST events; the widget runs on customers' own domains, so "*" by default.
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    # Read deadlines per request (producer_api/http_protocol.py): a client that has not sent its headers this
    # long after connecting (or after the first byte of a request), or its whole body this long after the
    # headers, is cut off (408 / close). uvicorn itself only times out idle keep-alive connections.
    http_header_timeout_s: float = 15.0
    http_body_timeout_s: float = 30.0
    max_body_bytes: int = 512 * 1024
    max_events_per_request: int = 100  # events of one ingest request (one raw-topic message)
    max_name_chars: int = 100
    max_properties_bytes: int = 4096
    # How often the API refreshes widget configs (tracking switch, tenant) from Postgres.
    widget_cache_refresh_s: float = 2.0
    # How long a request waits for Kafka delivery reports before answering 503.
    produce_timeout_s: float = 5.0
    retry_after_s: int = 5

    # --- Kafka ---------------------------------------------------------------------------------
    topic_prefix: str = "site-activity"
    topic_partitions: int = 6
    topic_replication_factor: int = 1
    # With acks=all, a write is acknowledged once this many replicas have it (only set on topics with
    # replication_factor > 1): 2 of 3 survives one broker loss without acknowledging unreplicated writes.
    topic_min_insync_replicas: int = 1
    producer_queue_max_messages: int = 200_000
    producer_linger_ms: int = 5
    producer_compression: str = "lz4"
    consumer_session_timeout_ms: int = 10_000
    consumer_heartbeat_interval_ms: int = 2_000
    # Longest a fetch may wait on the broker for data. Kafka answers as soon as data is there, so this only
    # bounds idle polling; some brokers (the embedded Tansu) hold every fetch for part of it, which then adds
    # straight to end-to-end latency at each consumer hop.
    consumer_fetch_wait_max_ms: int = 100
    # The largest message (key + value + headers, uncompressed) any producer of ours writes: librdkafka's
    # message.max.bytes. Must not exceed the topics' / broker's max.message.bytes (Kafka's default: 1 MB).
    # The API refuses a request whose raw message would not fit (minus key and framing: 413, see
    # topics.max_event_value_bytes); the processors split enriched output to fit it; what can never fit goes
    # to the dead-letter topic.
    kafka_max_message_bytes: int = 1_000_000

    # --- Kafka security and lag monitoring (issue 13: lag + security) ------------------------------
    # How every client of every stage reaches the brokers; mapped to confluent-kafka and to faust/aiokafka in
    # ONE place, site_activity/kafka_security.py. Secrets are SecretStr (repr/logs show "**********"); each
    # can instead be read from a file (`..._file`, e.g. a mounted Kubernetes secret), which wins when set.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_sasl_password_file: Path | None = None
    # OAUTHBEARER tokens: "oidc" = OAuth 2 client-credentials grant against kafka_oauth_token_endpoint_url
    # (Confluent Cloud, Redpanda, Keycloak...); "aws_msk_iam" = signed MSK IAM tokens from the AWS credential
    # chain (needs the `aws-msk-iam-sasl-signer-python` package and kafka_oauth_aws_region).
    kafka_oauth_provider: Literal["oidc", "aws_msk_iam"] = "oidc"
    kafka_oauth_token_endpoint_url: str = ""
    kafka_oauth_client_id: str = ""
    kafka_oauth_client_secret: SecretStr = SecretStr("")
    kafka_oauth_client_secret_file: Path | None = None
    kafka_oauth_scope: str = ""
    kafka_oauth_aws_region: str = ""
    # TLS (SSL and SASL_SSL): CA bundle to trust (unset: the system's), client certificate + key for mTLS.
    kafka_ssl_ca_file: Path | None = None
    kafka_ssl_cert_file: Path | None = None
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_key_password: SecretStr = SecretStr("")
    kafka_ssl_key_password_file: Path | None = None
    kafka_ssl_check_hostname: bool = True
    # Extra consumer groups `site-activity lag` watches besides the pipeline's own (processors, sink, and
    # webhooks once that stage exists); their topics are those the group's live members are assigned.
    lag_extra_groups: list[str] = Field(default_factory=list)
    # Lag evaluation: every lag_interval_s (the CLI's --watch/--serve and each stage's /metrics collector),
    # Burrow-style statuses over the last lag_window samples (site_activity/lag.py documents the rules).
    lag_interval_s: float = 10.0
    lag_window: int = 10
    # Port of `site-activity lag --serve` (/metrics).
    lag_exporter_port: int = 9308
    # Retention of the event topics (raw, enriched: kept for replay) and of the dead-letter topic; applied by
    # `site-activity topics` to existing topics too. Links, erasures and the processors' changelog are compacted.
    topic_events_retention_ms: int = 7 * 24 * 3600 * 1000
    topic_dead_letter_retention_ms: int = 30 * 24 * 3600 * 1000
    # The dead-letter limit of the consuming stages (site_activity/dead_letters.py, DeadLetterLimit): a stage
    # stops without committing after more than `…_max_consecutive` invalid messages in a row, or when more than
    # `…_max_ratio` of its last `…_ratio_window` messages were invalid. 0 turns a rule off.
    dead_letter_max_consecutive: int = Field(default=1_000, ge=0)
    dead_letter_max_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    dead_letter_ratio_window: int = Field(default=10_000, ge=0)

    # --- sink ----------------------------------------------------------------------------------
    sink_group: str = "site-activity-sink"
    sink_http_port: int = 8002  # /healthz and /metrics of the sink process
    sink_batch_max_events: int = 20_000  # bigger batches amortise each transaction's fixed cost
    sink_batch_max_s: float = 0.25  # the freshness a batch costs: up to this long waiting for more rows
    sink_retry_max_backoff_s: float = 10.0
    # Read the processors' enriched stream; set false to sink the raw topic directly (no processors).
    sink_from_enriched: bool = True
    # --- rollups (read surfaces, issue 12: dashboard and stats) ---
    # The sink's inserts maintain the rollups (migration 0006 triggers) in the same transaction. False skips
    # that work on the sink's connection (benchmarks): the rollups then go stale until `rollups rebuild`.
    sink_rollups: bool = True

    # --- processors ----------------------------------------------------------------------------
    processors_app_id: str = "site-activity-processors"
    session_gap_s: float = 30 * 60
    # One take() batch: at most this many raw messages (one per ingest request, <= 25 events from the widget),
    # or whatever arrived within processors_batch_max_s. Live traffic closes batches by time long before this;
    # a backlog (catching up after an outage) is worked through in big batches: 2,000 gave one worker ~15 %
    # more events/s than 500 (bench/README.md), and a batch of 2,000 takes well under a second.
    processors_batch_max_messages: int = 2_000
    # The wait for a batch to fill. While the worker processes a batch its event loop cannot hand the Kafka
    # consumer's fetched records on, so the next fetch is only asked for afterwards and a backlog's next batch
    # often does not fill before this runs out: 0.05 s instead of 0.2 s gave one worker ~10 % more events/s on
    # Apache Kafka (bench/README.md), and live traffic waits less in the processors.
    processors_batch_max_s: float = 0.05
    processors_web_port: int = 6066
    # Recent sessions / identity links remembered per visitor to place late events (see stream_processors/state.py).
    processors_max_sessions: int = 16
    processors_max_links: int = 8
    # Event ids remembered per visitor, so that a copy of an event (retry, re-send with another clock) changes
    # nothing and derives nothing (state.py, "Duplicates"). One API request holds at most max_events_per_request.
    processors_max_recent_events: int = 100
    # How long the repair of offsets faust skipped (transport.py) keeps trying to read them before the worker
    # exits without committing (a restarted worker redoes them).
    processors_repair_timeout_s: float = 120.0
    # librdkafka's batch.size for the processors' producer (enriched events, links, table changelog): max bytes
    # of one produce batch (librdkafka's term: the records sent to one partition in one request). 1 = one record
    # per produce batch, which a broker with wrong end offsets (the embedded Tansu) needs for exact table
    # recovery after a crash.
    processors_producer_batch_size: int = 1_000_000
    # --- processors: state store and expiry (issue 14) ---
    # faust table store of the visitor state: "rocksdb://" (on disk under <data_dir>/processors, recovery reads
    # only the changelog tail) or "memory://" (rebuilt from the whole changelog on every start).
    processors_store_url: str = "rocksdb://"
    # faust table_standby_replicas: workers that keep a warm copy of another worker's partitions.
    processors_standby_replicas: int = 1
    # Late-event horizon: a visitor with no event processed for this long loses its sessions and recent event
    # ids (links are kept); a later event of theirs is placed as if those sessions were forgotten (README).
    processors_state_horizon_s: float = 7 * 24 * 3600
    # The expiry scan: every interval, up to this many visitor records are checked (resuming where it stopped).
    processors_expiry_interval_s: float = 10.0
    processors_expiry_scan_keys: int = 20_000

    # --- console (management API and pages) ---------------------------------------------------
    console_port: int = 8003
    # Signs session cookies and CSRF tokens. Empty: a random key kept in <data_dir>/console-secret (fine for
    # one console process; set it explicitly when several replicas serve the console).
    console_secret_key: str = ""
    # Where sign-in links point (the console as browsers reach it). Empty: http://<http_host>:<console_port>.
    console_public_url: str = ""
    console_session_ttl_s: int = 12 * 3600
    # Postgres connections the console keeps open and reuses (requests beyond that wait up to 5 s, then 503).
    console_db_pool_size: int = Field(default=10, ge=1)
    console_login_link_ttl_s: int = 15 * 60
    # Mark cookies Secure (only sent over HTTPS). Off by default: the embedded stack serves plain HTTP.
    console_cookie_secure: bool = False

    # --- read API and activity pages (issue 12: events / visitors / timelines) -------------------
    # Requests per minute per API key on /api/v1 (token bucket, burst = the limit). Counted in each console
    # process: N replicas allow up to N times this.
    console_api_rate_limit_per_min: int = 240
    # Lifetime of a signed inbox-rail URL (POST /api/v1/rail-tokens).
    console_rail_token_ttl_s: int = 15 * 60
    # Who may frame the inbox rail panel: the CSP frame-ancestors value ("'self' https://inbox.example.com").
    console_rail_frame_ancestors: str = "'self'"

    # --- retention purge -----------------------------------------------------------------------
    # Rows per chunk: one DELETE statement in its own transaction. Bounds lock time and WAL per transaction
    # (Matomo uses 100k).
    purge_chunk_rows: int = 10_000
    # How often `dev` runs the purge in the background.
    purge_interval_s: float = 24 * 3600
    # Largest fraction of wall time the purge spends deleting (it rests between chunks for the rest), so the
    # sink keeps its rate while a purge runs; 1.0 = no pauses (a one-off catch-up run on an idle database).
    purge_duty_cycle: float = Field(default=0.25, gt=0, le=1)

    # --- export bundles (issue 13, export part; site_activity/export.py, export_jobs.py) ---------
    # Where the console's export jobs keep their archives; unset: <data_dir>/exports. With several console
    # replicas this must be one volume they all mount (any replica may serve a download).
    export_dir: Path | None = None
    # The console process runs export jobs in a background thread (off: only `site-activity export`).
    export_worker_enabled: bool = True
    export_poll_s: float = 1.0  # how often an idle worker looks for queued jobs and expired archives
    # A running job's lease, renewed every third of it; a job whose lease lapsed (worker died) is claimed again.
    export_lease_s: float = 60.0
    export_max_attempts: int = 3  # claims of one job before it is marked failed
    export_ttl_s: float = 7 * 24 * 3600  # a finished archive is deleted (status expired) this long after it finished

    # --- webhooks (issue 13: visitor_event.created; the `site-activity webhooks` stage) ----------
    webhooks_group: str = "site-activity-webhooks"
    webhooks_http_port: int = 8004  # /healthz and /metrics of the webhooks process
    # Endpoint URLs whose host resolves to a private, loopback, link-local or other non-global address are
    # refused (at create and again when connecting) unless this is on. `dev` and the tests turn it on.
    webhooks_allow_private_urls: bool = False
    webhooks_timeout_s: float = 15.0  # one attempt, connect to last byte
    # Delay before attempt 1, 2, ... (seconds); after the last one fails the delivery is `failed`.
    webhooks_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [0.0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    )
    # An endpoint whose attempts have all failed for this long is disabled (reason visible to its admins).
    webhooks_disable_after_s: float = 5 * 24 * 3600
    webhooks_endpoint_concurrency: int = 50  # requests in flight per endpoint and process (1 while failing)
    # Deliveries a process holds per healthy endpoint: sending plus waiting for one of its request slots
    # (handed over fresh, or claimed). Bursts of fresh events are sent without a claim round trip.
    webhooks_endpoint_prefetch: int = 200
    webhooks_max_in_flight: int = 500  # deliveries held (sending or waiting for a slot) per process, all endpoints
    webhooks_poll_interval_s: float = 0.5  # how often due retries are looked for (new events wake it at once)
    webhooks_batch_max_messages: int = 1000  # enriched-topic messages per enqueue transaction

    # --- observability -------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = True

    # --- one name per batch concept (issue 10): the old names of renamed settings ---------------------------
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # After the env source: a new name set anywhere wins over an old one.
        return init_settings, env_settings, _RenamedEnv(settings_cls), dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Maps old names (environment or keyword) to the new ones, logging a deprecation warning for each."""
        if not isinstance(data, dict) or not any(old in data for old in RENAMED_SETTINGS):
            return data
        data = dict(data)
        for old, (new, convert) in RENAMED_SETTINGS.items():
            if old not in data:
                continue
            value = data.pop(old)
            ignored = new in data
            if not ignored:
                data[new] = convert(value)
            # Names in the message too: settings are read before logging is set up (Python's last-resort
            # handler prints the message alone).
            old_env, new_env = ENV_PREFIX + old.upper(), ENV_PREFIX + new.upper()
            log.warning(
                f"deprecated setting {old_env}: use {new_env}" + (f" (ignored: {new_env} is set)" if ignored else ""),
                extra={"old": old_env, "new": new_env, "ignored": ignored},
            )
        return data

    @property
    def kafka_dist(self) -> Path:
        return self.kafka_dist_dir if self.kafka_dist_dir is not None else self.data_dir / "kafka"

    @property
    def exports_path(self) -> Path:
        """Where export archives live (export_dir, else <data_dir>/exports)."""
        return self.export_dir if self.export_dir is not None else self.data_dir / "exports"

    @property
    def stack_file(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def api_origin(self) -> str:
        """Where browsers and local tools reach the API (a wildcard bind address is not openable)."""
        return f"http://{reachable_host(self.http_host)}:{self.http_port}"

    @property
    def console_origin(self) -> str:
        """Where browsers reach the console; sign-in links point here."""
        return self.console_public_url.rstrip("/") or f"http://{reachable_host(self.http_host)}:{self.console_port}"

    # --- structure (issue 10): where each stage's probes are, derived from its port setting -------------
    def health_url(self, stage: Stage) -> str:
        """http://<reachable http_host>:<the stage's port>/healthz (STAGE_HTTP_PORT names the port setting)."""
        return f"http://{reachable_host(self.http_host)}:{getattr(self, STAGE_HTTP_PORT[stage])}/healthz"

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process see exactly these settings."""
        return {
            f"{ENV_PREFIX}{name.upper()}": _env_value(value)
            for name, value in self.model_dump().items()
            if value is not None
        }


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):  # a child process needs the secret itself, not its mask
        return value.get_secret_value()
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def reachable_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
