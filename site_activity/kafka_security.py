"""How every Kafka client reaches the brokers: the ONE mapping of the security settings (protocol, SASL
mechanism and credentials, TLS files) to confluent-kafka (librdkafka) configuration and to faust/aiokafka.

Every stage goes through here: confluent clients get `confluent_security()` merged by
site_activity/kafka.py (producer_config / consumer_config / admin), the faust app gets `faust_security()` as
App keyword arguments (stream_processors/app.py). Nothing else builds security configuration.

Secrets (SASL password, OAuth client secret, TLS key password) are SecretStr in Settings and are revealed
only into the built configuration, whose repr/str masks them (`ClientConfig`). A `..._file` setting, when
set, wins over the inline value (a mounted secret file; trailing newline stripped)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from site_activity.settings import Settings

MASK = "**********"
# Keys of a librdkafka config whose value is a secret (masked in repr/str of ClientConfig).
_SECRET_KEYS = (
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.key.pem",
    "sasl.oauthbearer.config",
)


class KafkaSecurityError(ValueError):
    """The security settings do not describe a usable connection (e.g. SASL without a username)."""


class ClientConfig(dict[str, Any]):
    """A librdkafka configuration dict (accepted by Producer/Consumer/AdminClient as is) whose repr and str
    mask secret values, so logging a config never leaks a password."""

    def masked(self) -> dict[str, Any]:
        """A plain copy with secret values replaced by MASK (what logs show; site_activity/logs.py)."""
        return {k: (MASK if k in _SECRET_KEYS and v else v) for k, v in self.items()}

    def __repr__(self) -> str:
        return repr(self.masked())

    __str__ = __repr__


def secret(settings: Settings, name: str) -> str:
    """The value of secret setting `name` (e.g. "kafka_sasl_password"): the file `<name>_file` when set, else
    the inline SecretStr. Raises KafkaSecurityError when the file cannot be read."""
    path: Path | None = getattr(settings, f"{name}_file")
    if path is not None:
        try:
            return path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise KafkaSecurityError(f"cannot read {name}_file {path}: {exc.strerror}") from None
    value: SecretStr | str = getattr(settings, name)  # a str after an unvalidated model_copy(update=...)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def uses_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


# --- confluent-kafka (librdkafka) -------------------------------------------------------------------------


def confluent_security(settings: Settings) -> dict[str, Any]:
    """librdkafka properties for the configured protocol: `security.protocol`, `sasl.*`, `ssl.*` (and an
    `oauth_cb` callable for MSK IAM). Raises KafkaSecurityError for an incomplete configuration."""
    conf: dict[str, Any] = {"security.protocol": settings.kafka_security_protocol}
    if uses_tls(settings):
        conf.update(_confluent_tls(settings))
    if uses_sasl(settings):
        conf.update(_confluent_sasl(settings))
    return conf


def _confluent_tls(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        # librdkafka verifies the broker's certificate by default; this adds the host name check.
        "ssl.endpoint.identification.algorithm": "https" if settings.kafka_ssl_check_hostname else "none",
    }
    if settings.kafka_ssl_ca_file is not None:
        conf["ssl.ca.location"] = str(settings.kafka_ssl_ca_file)
    if (settings.kafka_ssl_cert_file is None) != (settings.kafka_ssl_key_file is None):
        raise KafkaSecurityError("mutual TLS needs both kafka_ssl_cert_file and kafka_ssl_key_file")
    if settings.kafka_ssl_cert_file is not None:
        conf["ssl.certificate.location"] = str(settings.kafka_ssl_cert_file)
        conf["ssl.key.location"] = str(settings.kafka_ssl_key_file)
        key_password = secret(settings, "kafka_ssl_key_password")
        if key_password:
            conf["ssl.key.password"] = key_password
    return conf


def _confluent_sasl(settings: Settings) -> dict[str, Any]:
    mechanism = settings.kafka_sasl_mechanism
    conf: dict[str, Any] = {"sasl.mechanism": mechanism}
    if mechanism != "OAUTHBEARER":
        username, password = _user_password(settings)
        conf.update({"sasl.username": username, "sasl.password": password})
    elif settings.kafka_oauth_provider == "oidc":
        # librdkafka's own OIDC client-credentials flow (token fetch and refresh inside librdkafka).
        _require(settings, "kafka_oauth_token_endpoint_url", "kafka_oauth_client_id")
        conf.update(
            {
                "sasl.oauthbearer.method": "oidc",
                "sasl.oauthbearer.token.endpoint.url": settings.kafka_oauth_token_endpoint_url,
                "sasl.oauthbearer.client.id": settings.kafka_oauth_client_id,
                "sasl.oauthbearer.client.secret": secret(settings, "kafka_oauth_client_secret"),
            }
        )
        if settings.kafka_oauth_scope:
            conf["sasl.oauthbearer.scope"] = settings.kafka_oauth_scope
    else:
        token = msk_iam_token_source(settings)
        # librdkafka calls oauth_cb(sasl.oauthbearer.config) -> (token, expiry as seconds since the epoch).
        conf["oauth_cb"] = lambda _config: token()
    return conf


def _user_password(settings: Settings) -> tuple[str, str]:
    password = secret(settings, "kafka_sasl_password")
    if not settings.kafka_sasl_username or not password:
        raise KafkaSecurityError(
            f"SASL {settings.kafka_sasl_mechanism} needs kafka_sasl_username and kafka_sasl_password"
            " (or kafka_sasl_password_file)"
        )
    return settings.kafka_sasl_username, password


def _require(settings: Settings, *names: str) -> None:
    missing = [n for n in names if not getattr(settings, n)]
    if missing:
        raise KafkaSecurityError(f"OAUTHBEARER ({settings.kafka_oauth_provider}) needs {', '.join(missing)}")


# --- OAUTHBEARER token sources (shared by both client libraries) -----------------------------------------

TokenSource = Callable[[], tuple[str, float]]  # () -> (token, expiry as seconds since the epoch)


def msk_iam_token_source(settings: Settings) -> TokenSource:
    """Signed AWS MSK IAM tokens (credentials from the standard AWS chain: env, profile, IRSA, instance role).
    Needs the `aws-msk-iam-sasl-signer-python` package, which is not a default dependency."""
    _require(settings, "kafka_oauth_aws_region")
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider  # type: ignore[import-not-found]
    except ImportError:
        raise KafkaSecurityError(
            "kafka_oauth_provider=aws_msk_iam needs the aws-msk-iam-sasl-signer-python"
            " package (pip install aws-msk-iam-sasl-signer-python)"
        ) from None
    region = settings.kafka_oauth_aws_region

    def token() -> tuple[str, float]:
        value, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        return value, expiry_ms / 1000

    return token


def oidc_token_source(settings: Settings, timeout_s: float = 10.0) -> TokenSource:
    """OAuth 2 client-credentials grant against kafka_oauth_token_endpoint_url (what librdkafka's
    `sasl.oauthbearer.method=oidc` does), for aiokafka, which has no built-in flow."""
    _require(settings, "kafka_oauth_token_endpoint_url", "kafka_oauth_client_id")
    url, client_id = settings.kafka_oauth_token_endpoint_url, settings.kafka_oauth_client_id
    client_secret, scope = secret(settings, "kafka_oauth_client_secret"), settings.kafka_oauth_scope

    def token() -> tuple[str, float]:
        import base64
        import json
        import urllib.parse
        import urllib.request

        form = urllib.parse.urlencode({"grant_type": "client_credentials", **({"scope": scope} if scope else {})})
        basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        request = urllib.request.Request(
            url,
            data=form.encode(),
            method="POST",
            headers={
                "Authorization": f"Basic {basic}",
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # raises HTTPError on 4xx/5xx
            body = json.loads(resp.read())
        return body["access_token"], time.time() + float(body.get("expires_in", 300))

    return token


class CachedTokenProvider:
    """An aiokafka AbstractTokenProvider over a TokenSource: reuses a token until a minute before it
    expires (aiokafka asks at every connection). The repr never shows the token."""

    def __init__(self, source: TokenSource, refresh_margin_s: float = 60.0) -> None:
        self._source = source
        self._margin = refresh_margin_s
        self._token: tuple[str, float] | None = None

    async def token(self) -> str:
        import asyncio

        if self._token is None or time.time() > self._token[1] - self._margin:
            self._token = await asyncio.get_running_loop().run_in_executor(None, self._source)
        return self._token[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def _token_provider(settings: Settings) -> Any:
    from aiokafka.abc import AbstractTokenProvider

    source = oidc_token_source(settings) if settings.kafka_oauth_provider == "oidc" else msk_iam_token_source(settings)
    AbstractTokenProvider.register(CachedTokenProvider)  # aiokafka checks isinstance
    return CachedTokenProvider(source)


# --- faust / aiokafka ------------------------------------------------------------------------------------


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context for aiokafka: system CAs or kafka_ssl_ca_file, optional client cert/key."""
    ctx = ssl.create_default_context(cafile=str(settings.kafka_ssl_ca_file) if settings.kafka_ssl_ca_file else None)
    if (settings.kafka_ssl_cert_file is None) != (settings.kafka_ssl_key_file is None):
        raise KafkaSecurityError("mutual TLS needs both kafka_ssl_cert_file and kafka_ssl_key_file")
    if settings.kafka_ssl_cert_file is not None:
        ctx.load_cert_chain(
            str(settings.kafka_ssl_cert_file),
            str(settings.kafka_ssl_key_file),
            password=secret(settings, "kafka_ssl_key_password") or None,
        )
    if not settings.kafka_ssl_check_hostname:
        ctx.check_hostname = False  # the certificate chain is still verified
    return ctx


def faust_security(settings: Settings) -> dict[str, Any]:
    """faust.App keyword arguments for the configured protocol: {} for PLAINTEXT, else `broker_credentials`
    (faust.SSLCredentials / SASLCredentials / OAuthCredentials; faust turns them into aiokafka's
    security_protocol, sasl_* and ssl_context for its consumer, producer and admin clients)."""
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    ctx = ssl_context(settings) if uses_tls(settings) else None
    if protocol == "SSL":
        return {"broker_credentials": faust.SSLCredentials(ctx)}
    if settings.kafka_sasl_mechanism == "OAUTHBEARER":
        return {"broker_credentials": faust.OAuthCredentials(oauth_cb=_token_provider(settings), ssl_context=ctx)}
    username, password = _user_password(settings)
    return {
        "broker_credentials": faust.SASLCredentials(
            username=username, password=password, mechanism=settings.kafka_sasl_mechanism, ssl_context=ctx
        )
    }
