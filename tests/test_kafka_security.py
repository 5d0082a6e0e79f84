"""Kafka security settings (site_activity/kafka_security.py): the one mapping to confluent-kafka and to
faust/aiokafka, for every protocol and SASL mechanism and every stage; secrets from files; secrets never in
a repr or a log line. Real clients validate each mapped configuration (librdkafka loads the TLS files and
checks every property when a client is created; aiokafka checks its SASL arguments). Then a real one: the
embedded Apache Kafka with a SASL_PLAINTEXT listener, the whole pipeline (API, faust processors, sink)
running through it with SCRAM-SHA-512, and a wrong password refused."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiokafka
import httpx
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr

from dev_stack.embedded import EmbeddedApacheKafka, EmbeddedPostgres, wait_until
from dev_stack.kafka_dist import broker_kind
from site_activity.kafka import admin, client_config, consumer_config, ensure_topics, producer_config
from site_activity.kafka_security import MASK, KafkaSecurityError, faust_security, secret
from site_activity.logs import JsonFormatter
from site_activity.settings import Settings
from tests.conftest import ROOT, Service, broker_settings, make_settings, wait_for_rows
from tests.test_pipeline import pageview, request_body

PASSWORD, CLIENT_SECRET, KEY_PASSWORD = "hunter2-sasl-pw", "oauth-cl1ent-s3cret", "keypass"
SECRETS = (PASSWORD, CLIENT_SECRET, KEY_PASSWORD)
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
CASES = [("PLAINTEXT", None), ("SSL", None)] + [(p, m) for p in ("SASL_PLAINTEXT", "SASL_SSL") for m in SASL_MECHANISMS]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a client certificate whose key is encrypted with KEY_PASSWORD (openssl)."""
    d = tmp_path_factory.mktemp("certs")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=site-activity-test-ca",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-keyout",
        "client.key",
        "-passout",
        f"pass:{KEY_PASSWORD}",
        "-out",
        "client.csr",
        "-subj",
        "/CN=client",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "2",
    )
    return {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key"}


def secure_settings(protocol: str, mechanism: str | None, certs: dict[str, Path], **more: Any) -> Settings:
    s: dict[str, Any] = {"kafka_bootstrap": "127.0.0.1:1", "kafka_security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        s.update(
            kafka_ssl_ca_file=certs["ca"],
            kafka_ssl_cert_file=certs["cert"],
            kafka_ssl_key_file=certs["key"],
            kafka_ssl_key_password=KEY_PASSWORD,
        )
    if mechanism is not None:
        s.update(
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username="alice",
            kafka_sasl_password=PASSWORD,
            kafka_oauth_token_endpoint_url="https://idp.example/oauth2/token",
            kafka_oauth_client_id="cid",
            kafka_oauth_client_secret=CLIENT_SECRET,
            kafka_oauth_scope="kafka",
        )
    return Settings(**{**s, **more})


def expected_confluent(protocol: str, mechanism: str | None, certs: dict[str, Path]) -> dict[str, Any]:
    want: dict[str, Any] = {"security.protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        want.update(
            {
                "ssl.ca.location": str(certs["ca"]),
                "ssl.certificate.location": str(certs["cert"]),
                "ssl.key.location": str(certs["key"]),
                "ssl.key.password": KEY_PASSWORD,
                "ssl.endpoint.identification.algorithm": "https",
            }
        )
    if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        want.update({"sasl.mechanism": mechanism, "sasl.username": "alice", "sasl.password": PASSWORD})
    elif mechanism == "OAUTHBEARER":
        want.update(
            {
                "sasl.mechanism": "OAUTHBEARER",
                "sasl.oauthbearer.method": "oidc",
                "sasl.oauthbearer.token.endpoint.url": "https://idp.example/oauth2/token",
                "sasl.oauthbearer.client.id": "cid",
                "sasl.oauthbearer.client.secret": CLIENT_SECRET,
                "sasl.oauthbearer.scope": "kafka",
            }
        )
    return want


@pytest.mark.parametrize(("protocol", "mechanism"), CASES)
def test_confluent_mapping_for_every_protocol_and_mechanism(
    protocol: str, mechanism: str | None, certs: dict[str, Path]
) -> None:
    s = secure_settings(protocol, mechanism, certs)
    want = expected_confluent(protocol, mechanism, certs)
    security_keys = {k for k in client_config(s) if k.startswith(("security.", "sasl.", "ssl."))}
    assert security_keys == set(want)
    for conf in (client_config(s), producer_config(s), consumer_config(s, "g")):
        assert {k: conf[k] for k in want} == want
    # librdkafka accepts them: it checks every property, and loads the CA, certificate and encrypted key.
    Producer(producer_config(s)).flush(0)
    Consumer(consumer_config(s, "g")).close()
    admin(s)


def test_a_wrong_key_password_is_refused_by_librdkafka(certs: dict[str, Path]) -> None:
    s = secure_settings("SSL", None, certs, kafka_ssl_key_password="wrong")
    with pytest.raises(KafkaException):
        Producer(producer_config(s))


@pytest.mark.parametrize(("protocol", "mechanism"), CASES)
def test_faust_mapping_for_every_protocol_and_mechanism(
    protocol: str, mechanism: str | None, certs: dict[str, Path]
) -> None:
    s = secure_settings(protocol, mechanism, certs)
    kwargs = faust_security(s)
    if protocol == "PLAINTEXT":
        assert kwargs == {}
        return
    auth = credentials_to_aiokafka_auth(kwargs["broker_credentials"])  # what faust hands aiokafka
    assert auth["security_protocol"] == protocol
    tls = protocol in ("SSL", "SASL_SSL")
    assert (auth.get("ssl_context") is not None) == tls
    if tls:
        assert auth["ssl_context"].verify_mode.name == "CERT_REQUIRED" and auth["ssl_context"].check_hostname
    if mechanism is not None:
        assert auth["sasl_mechanism"] == mechanism
        if mechanism == "OAUTHBEARER":
            assert isinstance(auth["sasl_oauth_token_provider"], aiokafka.abc.AbstractTokenProvider)
        else:
            assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("alice", PASSWORD)

    async def build() -> None:  # aiokafka validates protocol / mechanism / credentials on construction
        client = aiokafka.AIOKafkaClient(bootstrap_servers="127.0.0.1:1", **auth)
        await client.close()

    asyncio.run(build())


def test_the_processors_app_gets_the_mapping(certs: dict[str, Path], tmp_path: Path) -> None:
    from stream_processors.app import create_app

    s = secure_settings(
        "SASL_SSL", "SCRAM-SHA-512", certs, data_dir=tmp_path, processors_app_id=f"p-{uuid.uuid4().hex[:6]}"
    )
    app = create_app(s)
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["sasl_plain_username"]) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
        "alice",
    )


# --- every stage builds its clients through the mapping ----------------------------------------------------

PRODUCT = ("site_activity", "sink", "stream_processors", "producer_api", "console")
CLIENTS = {"Producer", "Consumer", "AdminClient"}
CONFIGS = {"producer_config", "consumer_config", "client_config"}


def test_every_kafka_client_in_product_code_is_built_from_the_mapped_config() -> None:
    """A source check (ast), so a new client cannot bypass the security settings: every confluent client is
    created from producer_config / consumer_config / client_config (site_activity/kafka.py), and the only
    faust App is created with faust_security()."""
    offenders, seen = [], 0
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "embedded.py":  # the embedded test broker's own readiness probe (loopback)
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CLIENTS):
                    continue
                seen += 1
                arg = node.args[0] if node.args else None
                if not (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id in CONFIGS):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert seen >= 8  # the check does see the clients
    assert not offenders, offenders
    app_source = (ROOT / "stream_processors" / "app.py").read_text()
    assert "**faust_security(settings)" in app_source
    assert "AdminClient(client_config(settings))" in (ROOT / "site_activity" / "kafka.py").read_text()


class Recorder:
    """Wraps a confluent client class: records each configuration and builds the real client with it."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.configs: list[Any] = []

    def __call__(self, conf: dict[str, Any], **kwargs: Any) -> Any:
        self.configs.append(conf)
        return self.cls(conf, **kwargs)


def test_every_stage_uses_the_mapping(certs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real constructors of each stage's Kafka clients (API producer, sink consumer and dead letters,
    processors' outputs and repair reader, console/CLI erasure notifier, topics admin, lag monitor) get the
    SASL_SSL/SCRAM settings."""
    import producer_api.producer
    import sink.dead_letter
    import sink.main
    import site_activity.kafka
    import site_activity.lag
    import stream_processors.outputs
    import stream_processors.repair
    from producer_api.metrics import ApiMetrics
    from site_activity import erasure
    from site_activity.lag import LagMonitor, sink_group

    producers, consumers, admins = Recorder(Producer), Recorder(Consumer), Recorder(AdminClient)
    for module in (producer_api.producer, sink.dead_letter, stream_processors.outputs):
        monkeypatch.setattr(module, "Producer", producers)
    monkeypatch.setattr("confluent_kafka.Producer", producers)  # erasure imports it at call time
    for module in (sink.main, stream_processors.repair, site_activity.lag):
        monkeypatch.setattr(module, "Consumer", consumers)
    monkeypatch.setattr(site_activity.kafka, "AdminClient", admins)

    s = secure_settings("SASL_SSL", "SCRAM-SHA-512", certs, data_dir=tmp_path)
    producer_api.producer.EventProducer(s, ApiMetrics())
    sink.main.Sink(s)
    stream_processors.outputs.Outputs(s)
    reader = stream_processors.repair.SkippedReader(s, {"t": lambda _m: None}, timeout_s=0.1, on_give_up=lambda: None)
    reader.read("t", 0, [0])
    erasure.kafka_notifier(s, timeout_s=0.1)([])
    monitor = LagMonitor(s, [sink_group(s)])
    monitor._reader_consumer()
    monitor.close()
    admin(s)
    want = expected_confluent("SASL_SSL", "SCRAM-SHA-512", certs)
    for rec, n in ((producers, 4), (consumers, 3), (admins, 2)):
        assert len(rec.configs) >= n, (rec.cls, len(rec.configs))
        for conf in rec.configs:
            assert {k: conf[k] for k in want} == want


def test_oidc_tokens_for_aiokafka_come_from_the_token_endpoint_and_are_reused(certs: dict[str, Path]) -> None:
    """The aiokafka side of OAUTHBEARER/oidc: a client-credentials grant (client id/secret as HTTP Basic)
    against a real local token endpoint; the token is reused until a minute before it expires."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs

    seen: list[tuple[str, dict[str, list[str]]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            seen.append((self.headers["Authorization"], parse_qs(body)))
            out = json.dumps({"access_token": f"tok-{len(seen)}", "token_type": "bearer", "expires_in": 3600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/token"
        s = secure_settings("SASL_PLAINTEXT", "OAUTHBEARER", certs, kafka_oauth_token_endpoint_url=url)
        provider = credentials_to_aiokafka_auth(faust_security(s)["broker_credentials"])["sasl_oauth_token_provider"]

        async def two_tokens() -> list[str]:
            return [await provider.token(), await provider.token()]

        assert asyncio.run(two_tokens()) == ["tok-1", "tok-1"]
        assert len(seen) == 1
        auth, form = seen[0]
        assert auth == "Basic " + base64.b64encode(f"cid:{CLIENT_SECRET}".encode()).decode()
        assert form == {"grant_type": ["client_credentials"], "scope": ["kafka"]}
        assert CLIENT_SECRET not in repr(provider)
    finally:
        server.shutdown()


# --- secrets -----------------------------------------------------------------------------------------------


def test_secrets_from_files_win_over_inline_values(tmp_path: Path, certs: dict[str, Path]) -> None:
    (tmp_path / "pw").write_text("from-file-pw\n")
    s = secure_settings("SASL_SSL", "SCRAM-SHA-256", certs, kafka_sasl_password_file=tmp_path / "pw")
    assert secret(s, "kafka_sasl_password") == "from-file-pw"
    assert producer_config(s)["sasl.password"] == "from-file-pw"
    missing = secure_settings("SASL_SSL", "SCRAM-SHA-256", certs, kafka_sasl_password_file=tmp_path / "nope")
    with pytest.raises(KafkaSecurityError, match="cannot read kafka_sasl_password_file"):
        producer_config(missing)


def test_incomplete_settings_are_refused_with_a_reason(certs: dict[str, Path]) -> None:
    with pytest.raises(KafkaSecurityError, match="needs kafka_sasl_username"):
        producer_config(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN"))
    with pytest.raises(KafkaSecurityError, match="kafka_oauth_token_endpoint_url"):
        faust_security(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="OAUTHBEARER"))
    with pytest.raises(KafkaSecurityError, match="both kafka_ssl_cert_file and kafka_ssl_key_file"):
        producer_config(Settings(kafka_security_protocol="SSL", kafka_ssl_cert_file=certs["cert"]))


def test_msk_iam_without_its_signer_package_fails_with_what_to_install() -> None:
    s = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="OAUTHBEARER",
        kafka_oauth_provider="aws_msk_iam",
        kafka_oauth_aws_region="eu-west-1",
    )
    import importlib.util

    assert importlib.util.find_spec("aws_msk_iam_sasl_signer") is None  # not a default dependency
    for build in (producer_config, faust_security):
        with pytest.raises(KafkaSecurityError, match="aws-msk-iam-sasl-signer-python"):
            build(s)
    with pytest.raises(KafkaSecurityError, match="kafka_oauth_aws_region"):
        producer_config(s.model_copy(update={"kafka_oauth_aws_region": ""}))


def test_secrets_are_never_in_reprs_or_logs(certs: dict[str, Path]) -> None:
    s = secure_settings("SASL_SSL", "PLAIN", certs)
    oauth = secure_settings("SASL_SSL", "OAUTHBEARER", certs)
    shown = [repr(s), str(s), s.model_dump_json(), repr(oauth)]
    for conf in (producer_config(s), consumer_config(s, "g"), client_config(s), producer_config(oauth)):
        shown += [repr(conf), str(conf), f"{conf}"]
        assert MASK in repr(conf)
    shown += [repr(faust_security(s)), repr(faust_security(oauth))]
    # a JSON log line with the config and the settings as fields
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test-secrets")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("connecting", extra={"config": producer_config(s), "oauth": client_config(oauth), "settings": s})
    finally:
        log.removeHandler(handler)
    shown.append(stream.getvalue())
    assert json.loads(stream.getvalue())["config"]["sasl.password"] == MASK
    for text in shown:
        for value in SECRETS:
            assert value not in text, (value, text[:300])
    # while the child-process environment carries the real values (a stage must be able to log in)
    assert s.to_env()["SITE_ACTIVITY_KAFKA_SASL_PASSWORD"] == PASSWORD


# --- a real SASL listener ----------------------------------------------------------------------------------

USERS = {"alice": "alice-plain-pw"}
SCRAM_USER, SCRAM_PASSWORD = "bob", "bob-scram-512-pw"


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedApacheKafka]:
    """The embedded Apache Kafka with a SASL_PLAINTEXT listener (PLAIN user alice; SCRAM-SHA-512 user bob
    created through the admin API over the plaintext listener)."""
    base = broker_settings()
    if broker_kind(base) != "kafka":
        pytest.skip("a SASL listener needs the embedded Apache Kafka (Java 17+); Tansu has no SASL")
    cluster = EmbeddedApacheKafka.from_settings(base, tmp_path_factory.mktemp("sasl-kafka"), nodes=1, free_ports=True)
    cluster.sasl_users = dict(USERS)
    cluster.start()
    try:
        plain = AdminClient({"bootstrap.servers": cluster.bootstrap})
        upsert = UserScramCredentialUpsertion(
            SCRAM_USER, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), SCRAM_PASSWORD.encode()
        )
        for future in plain.alter_user_scram_credentials([upsert]).values():
            future.result(timeout=30)
        yield cluster
    finally:
        cluster.stop()


def sasl_settings(cluster: EmbeddedApacheKafka, mechanism: str, user: str, password: str, **more: Any) -> Settings:
    return Settings(
        kafka_bootstrap=cluster.sasl_bootstrap,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism=mechanism,  # type: ignore[arg-type]
        kafka_sasl_username=user,
        kafka_sasl_password=SecretStr(password),
        **more,
    )


def test_a_wrong_password_is_refused_by_the_broker(sasl_kafka: EmbeddedApacheKafka) -> None:
    errors: list[KafkaError] = []
    s = sasl_settings(sasl_kafka, "PLAIN", "alice", "not-the-password")
    client = AdminClient(client_config(s, error_cb=errors.append))
    with pytest.raises(KafkaException):
        client.list_topics(timeout=5)
    client.poll(1)  # serves the error callback
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    ok = AdminClient(client_config(sasl_settings(sasl_kafka, "PLAIN", "alice", USERS["alice"])))
    assert ok.list_topics(timeout=20).brokers


def test_the_whole_pipeline_runs_through_a_sasl_scram_listener(
    sasl_kafka: EmbeddedApacheKafka, postgres: EmbeddedPostgres, make_widget: Callable[..., Any], tmp_path: Path
) -> None:
    """API (confluent producer), processors (faust/aiokafka consumer and producers) and sink (confluent
    consumer) all log in with SCRAM-SHA-512 on the SASL listener: a POSTed event becomes a row."""

    class Broker:  # make_settings wants the broker's bootstrap
        bootstrap = sasl_kafka.sasl_bootstrap

    s = make_settings(
        Broker(),  # type: ignore[arg-type]
        postgres,
        tmp_path / "data",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=SCRAM_USER,
        kafka_sasl_password=SecretStr(SCRAM_PASSWORD),
    )
    ensure_topics(s)  # the topics are created through the SASL listener as well (make_settings did it first)
    services = []
    try:
        for stage, health in (
            ("api", s.health_url("api")),
            ("processors", s.health_url("processors")),
            ("sink", s.health_url("sink")),
        ):
            svc = Service(stage, s, tmp_path)
            svc.ready = lambda url=health: _ok(url)
            services.append(svc)
            svc.start(timeout=90)
        w = make_widget()
        body = request_body(w.id, [pageview(datetime.now(UTC))], visitor="v-sasl")
        resp = httpx.post(f"http://127.0.0.1:{s.http_port}/api/widget/track", json=body, timeout=10)
        assert resp.status_code == 204, resp.text
        import psycopg

        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            rows = wait_for_rows(
                conn, "SELECT event_type, session_id FROM visitor_events WHERE widget_id = %s", (w.id,), 2, timeout=60
            )  # the pageview and the processors' session_start
        assert sorted(r[0] for r in rows) == ["pageview", "session_start"]
        assert all(r[1] is not None for r in rows)  # sessions come from the processors: faust got through

        # and the processors' lag collector reads its group through the same listener
        def processors_lag() -> float | None:
            text = httpx.get(f"http://127.0.0.1:{s.processors_web_port}/metrics", timeout=5).text
            got = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("kafka_consumergroup_group_sum_lag{") and f'group="{s.processors_app_id}"' in line
            ]
            return got[0] if got else None

        wait_until(lambda: processors_lag() == 0, 60, "processors lag gauge at 0")
    finally:
        for svc in reversed(services):
            svc.stop()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
