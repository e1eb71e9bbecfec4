"""How the settings choose TLS towards Temporal (local dev server, Cloud API key, mTLS)."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from config.settings import Settings
from config.temporal_tls import temporal_tls


def test_the_dev_server_gets_plain_text() -> None:
    assert temporal_tls(Settings(), api_key=False) is False


def test_an_api_key_turns_server_tls_on() -> None:
    assert temporal_tls(Settings(), api_key=True) is True


def test_client_certificates_make_mtls(tmp_path: Path) -> None:
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    cert.write_bytes(b"CERT")
    key.write_bytes(b"KEY")
    ca.write_bytes(b"CA")
    settings = Settings(
        temporal_tls_client_cert_path=cert,
        temporal_tls_client_key_path=key,
        temporal_tls_server_ca_cert_path=ca,
        temporal_tls_server_name="temporal-frontend.temporal.svc",
    )
    tls = temporal_tls(settings, api_key=False)
    assert tls == TLSConfig(
        server_root_ca_cert=b"CA",
        domain="temporal-frontend.temporal.svc",
        client_cert=b"CERT",
        client_private_key=b"KEY",
    )


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "tls.crt"
    cert.write_bytes(b"CERT")
    with pytest.raises(ValueError, match="go together"):
        temporal_tls(Settings(temporal_tls_client_cert_path=cert), api_key=False)
