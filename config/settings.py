"""The one settings object. Every entry point builds it once and passes it down.

Values come from the environment (prefix ``PAYMENTS_``) or a ``.env`` file;
``DATABASE_URL`` is also read without the prefix because that is where every
PostgreSQL host puts it.
"""

from __future__ import annotations

import sys
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.codec import PayloadKeyError, parse_payload_keys

# Secrets that ship in this repository for local development only.
DEV_PROVIDER_API_KEY = "sk_test_sandbox_local"
_PLACEHOLDER_SECRETS = {DEV_PROVIDER_API_KEY, "changeme", ""}


def venv_bin(name: str) -> str:
    """Path of an executable installed beside this interpreter (the venv's bin/)."""
    return str(Path(sys.executable).parent / name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PAYMENTS_", env_file=".env", extra="ignore", frozen=True
    )

    environment: Literal["development", "test", "production"] = "development"

    # PostgreSQL (the ledger). SQLAlchemy URL; plain postgresql:// is accepted too.
    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/payments",
        validation_alias=AliasChoices("DATABASE_URL", "PAYMENTS_DATABASE_URL"),
    )
    # Per process. In the storm benchmark one API process with 20 connections answered
    # 862 of 1,000 requests' tries with 503 (pool timeouts: a saturated event loop holds
    # each connection longer); with 50, 363, and its CPU per payment fell by 27 %.
    database_pool_size: int = 25
    database_max_overflow: int = 25
    # How long a request waits for a pooled connection before answering 503 (SQLAlchemy's
    # default is 30 s, far past the API's own bounded wait).
    database_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    # The API process's own pool for its idempotency reads by key and by id (plain
    # psycopg, no ORM: ledger/reads.py), besides the pool above.
    database_read_pool_size: int = Field(default=20, ge=1)
    # Connections that pool opens at start and keeps. Opening one took ~50 ms at a
    # storm's start (each round trip a turn of a loop reading 1,000 requests), and with
    # one open the clients' first key lookups queued behind each other for it.
    database_read_pool_min_size: int = Field(default=8, ge=1)

    # Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "payments"
    temporal_tls: bool = False
    temporal_api_key: SecretStr | None = None
    # mTLS (a self-hosted cluster with client certificates, or Temporal Cloud with
    # certificates instead of an API key): PEM file paths, mounted from a Secret.
    temporal_tls_client_cert_path: Path | None = None
    temporal_tls_client_key_path: Path | None = None
    temporal_tls_server_ca_cert_path: Path | None = None  # None: the system's roots
    temporal_tls_server_name: str | None = None

    # Payment provider (the sandbox locally; a real adapter in production)
    provider_url: str = "http://127.0.0.1:8100"
    provider_api_key: SecretStr = SecretStr(DEV_PROVIDER_API_KEY)
    provider_timeout_seconds: float = 10.0

    # Processes per host (make run, the benchmark, the image's API command); in
    # Kubernetes scale by replicas instead and keep these at 1.
    api_processes: int = Field(default=1, ge=1)
    # Set by `python -m api` for the processes it starts when it starts several: the
    # shared-memory file on which they share the keys being admitted
    # (api/admission_board.py). Not a setting to set by hand.
    api_admission_board: Path | None = None
    worker_processes: int = Field(default=1, ge=1)
    # On one host, the worker and the Temporal dev server run at this nice value,
    # below the API, so clients' requests do not wait behind them for a CPU (in
    # Kubernetes the API's own CPU requests do this). Measured in the storm
    # (docs/scaling.md, "The priority round"): nice 10 took the repeats' p99 from
    # 0.48-0.54 s to 0.16-0.24 s at the same payments/s, the worker keeping pace
    # (workflows closed 0.5-4.7 s after the last ledger row, RSS 185-196 MB). Before
    # the backlog gate, the same setting let the worker fall behind; 0 turns it off.
    # (The test suite's stacks, devstack.stack.StackConfig, run everything at 0.)
    background_nice: int = Field(default=10, ge=0, le=19)
    # The SDK core's coded warnings (a workflow task over 5 s) written per second and
    # worker process; the rest are counted on a sdk.warnings_suppressed line.
    worker_core_warning_lines_per_second: int = Field(default=1, ge=0)

    # API behaviour
    api_wait_seconds: float = Field(default=5.0, ge=0, le=60)
    # A revoked key is refused by each API process within this many seconds.
    api_key_cache_seconds: float = Field(default=5.0, ge=0)
    # Active API keys each API process keeps in memory, the newest first, reloaded every
    # third of the cache period (api/auth.py, keep_mirrored); 0: keys are looked up on
    # their first request only.
    api_key_mirror_size: int = Field(default=10_000, ge=0)
    # New payments wait for room (then 503) while this many, across the deployment, have
    # no recorded outcome (api/backlog.py); 0 turns the gate off. Keep it under the
    # workers' workflow cache (1,000 runs per worker process) so no run is evicted.
    api_max_processing_payments: int = Field(default=200, ge=0)
    # Starts of runs in flight at once per API process (api/backlog.py, StartSlots);
    # 0: no limit. 16 cut the storm's replay p99 from about 2 s to 0.5-0.9 s, but refused
    # more new payments (docs/scaling.md): a choice for a deployment, not a default.
    api_max_concurrent_starts: int = Field(default=0, ge=0)
    # New payment requests let into the app per turn of the API's event loop, and as many
    # requests whose wait ran out let out; repeats of keys the process has seen
    # skip the line (api/admission.py). 0 lets all in (and out) at once.
    api_admissions_per_turn: int = Field(default=1, ge=0)
    # Keys each API process remembers to recognise a repeat before reading anything.
    api_remembered_keys: int = Field(default=50_000, ge=0)
    # How long the API keeps a client's idle connection open (uvicorn's default is 5 s).
    # Longer than a load balancer's idle timeout (60 s on AWS's ALB), so the balancer
    # closes idle connections, never the API under a request it just sent.
    api_keep_alive_seconds: int = Field(default=75, ge=1, le=3600)
    # The longest wait a client may ask for with `Prefer: wait=N`.
    api_max_wait_seconds: float = Field(default=30.0, ge=1, le=300)
    # Larger payments go through a human (minor units).
    api_max_amount: int = Field(default=99_999_999, gt=0)
    api_max_body_bytes: int = Field(default=64 * 1024, gt=0)
    # Per client and per API process: a token bucket refilled at this rate.
    api_rate_limit_per_second: float = Field(default=100.0, gt=0)
    api_rate_limit_burst: int = Field(default=200, ge=1)
    # Canonical lines of requests turned away (429, 503, 409 in progress) per second and
    # API process; the rest are counted on one http.requests_shed line a second
    # (api/access_log.py). One a second keeps an example with its request id; the
    # counts carry the rest.
    api_shed_log_lines_per_second: int = Field(default=1, ge=0)

    # Webhooks
    webhook_timeout_seconds: float = 10.0
    # Also allow http and loopback webhook URLs (activities/url_safety.py): the dev
    # stack and the tests, whose receiver is at http://127.0.0.1. Never in production.
    webhook_allow_loopback: bool = False

    # Metrics (Prometheus). The API serves /metrics on its own port; each worker process
    # serves the SDK's metrics and our business metrics on two more ports (0 turns one off).
    # All interfaces by default, so Prometheus reaches a container; the dev stack binds
    # its own host.
    metrics_host: str = "0.0.0.0"
    worker_sdk_metrics_port: int = Field(default=9000, ge=0, le=65535)
    worker_metrics_port: int = Field(default=9001, ge=0, le=65535)
    # Payload encryption (config/codec.py): "id:base64key,..." or JSON {"id": "base64key"};
    # the active id seals new payloads, every listed key still opens old ones.
    payload_keys: SecretStr | None = None
    payload_key_id: str | None = None
    # The codec endpoint the Temporal UI decodes through (/codec on the API): staff token,
    # and the one browser origin (the UI's) allowed to call it.
    codec_auth_token: SecretStr | None = None
    codec_cors_origin: str | None = None

    # Logging
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @model_validator(mode="after")
    def _refuse_placeholder_secrets_in_production(self) -> Settings:
        if self.environment == "production":
            if self.provider_api_key.get_secret_value() in _PLACEHOLDER_SECRETS:
                raise ValueError("PAYMENTS_PROVIDER_API_KEY must be set in production")
            if self.webhook_allow_loopback:
                raise ValueError("PAYMENTS_WEBHOOK_ALLOW_LOOPBACK is for development only")
            if self.payload_keyring is None:
                raise ValueError("PAYMENTS_PAYLOAD_KEYS must be set in production")
            token = self.codec_auth_token
            if token is not None and len(token.get_secret_value()) < 32:
                raise ValueError("PAYMENTS_CODEC_AUTH_TOKEN needs at least 32 characters")
        return self

    @model_validator(mode="after")
    def _payload_keys_usable(self) -> Settings:
        try:
            _ = self.payload_keyring
        except PayloadKeyError as exc:
            raise ValueError(str(exc)) from None
        return self

    @cached_property
    def payload_keyring(self) -> tuple[dict[str, bytes], str] | None:
        """(keys by id, active id), or None when payload encryption is off."""
        if self.payload_keys is None:
            return None
        keys = parse_payload_keys(self.payload_keys.get_secret_value())
        if not keys:
            return None
        active = self.payload_key_id
        if active is None:
            if len(keys) != 1:
                raise PayloadKeyError("PAYMENTS_PAYLOAD_KEY_ID must name the active key")
            active = next(iter(keys))
        if active not in keys:
            raise PayloadKeyError(f"PAYMENTS_PAYLOAD_KEY_ID {active!r} is not in the keys")
        return keys, active

    @cached_property
    def sqlalchemy_url(self) -> str:
        return sqlalchemy_url(self.database_url)


def sqlalchemy_url(database_url: str) -> str:
    """The database URL with the psycopg 3 driver named, whatever form it came in."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url
