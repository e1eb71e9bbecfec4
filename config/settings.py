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
    database_pool_size: int = 10
    database_max_overflow: int = 10

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
    worker_processes: int = Field(default=1, ge=1)

    # API behaviour
    api_wait_seconds: float = Field(default=5.0, ge=0, le=60)
    api_key_cache_seconds: float = 30.0

    # Webhooks
    webhook_timeout_seconds: float = 10.0
    webhook_allow_loopback: bool = False

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
        return self

    @cached_property
    def sqlalchemy_url(self) -> str:
        return sqlalchemy_url(self.database_url)


def sqlalchemy_url(database_url: str) -> str:
    """The database URL with the psycopg 3 driver named, whatever form it came in."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url
