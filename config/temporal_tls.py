"""TLS towards Temporal from settings: off for the dev server, server TLS for an API
key (Temporal Cloud) or ``PAYMENTS_TEMPORAL_TLS``, mTLS when a client certificate is
configured (a cluster from Temporal's Helm chart with mTLS, or Temporal Cloud)."""

from __future__ import annotations

from temporalio.service import TLSConfig

from config.settings import Settings


def temporal_tls(settings: Settings, *, api_key: bool) -> bool | TLSConfig:
    cert, key = settings.temporal_tls_client_cert_path, settings.temporal_tls_client_key_path
    if (cert is None) != (key is None):
        raise ValueError(
            "PAYMENTS_TEMPORAL_TLS_CLIENT_CERT_PATH and PAYMENTS_TEMPORAL_TLS_CLIENT_KEY_PATH "
            "go together"
        )
    ca = settings.temporal_tls_server_ca_cert_path
    if cert is None and ca is None and settings.temporal_tls_server_name is None:
        return settings.temporal_tls or api_key
    return TLSConfig(
        server_root_ca_cert=ca.read_bytes() if ca else None,
        domain=settings.temporal_tls_server_name,
        client_cert=cert.read_bytes() if cert else None,
        client_private_key=key.read_bytes() if key else None,
    )
