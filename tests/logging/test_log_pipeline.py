"""The process-wide pipeline, run as the API and the worker run it: in a fresh
interpreter, writing to a pipe (JSON) or a terminal (console)."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from admin.credentials import new_api_key, new_webhook_secret

REPO_ROOT = Path(__file__).resolve().parents[2]

API_KEY = new_api_key()
WEBHOOK_SECRET = new_webhook_secret()
PROVIDER_KEY = "sk_live_51HxQa2eZvKYlo2C0provider"
CARD_TOKEN = "pm_card_visa"
CODEC_TOKEN = "codec-token-that-has-no-prefix-at-all"
SECRETS = [API_KEY, WEBHOOK_SECRET, PROVIDER_KEY, CARD_TOKEN, CODEC_TOKEN]

# Each secret reaches the logs by a different road: message text, a field, a nested
# header dict, a stdlib logger's %-args, an exception's message and traceback.
LEAKY_PROGRAM = f"""
import logging, structlog
from config.logging import configure_logging
configure_logging("INFO", "json")
log = structlog.get_logger("api")
log.info("auth.failed", authorization="Bearer {API_KEY}")
log.info("payment.request", body={{"payment_method": "{CARD_TOKEN}", "amount": 1250}})
log.info("webhook.configured text whsec={WEBHOOK_SECRET}", idempotency_key="order-1")
log.info("http.call", headers={{"Authorization": "Basic abc", "X-Codec": "x"}},
         codec_auth_token="{CODEC_TOKEN}")
logging.getLogger("uvicorn.error").warning("provider said: bad key %s", "{PROVIDER_KEY}")
logging.getLogger("temporalio.activity").info("card %s declined", "{CARD_TOKEN}")
try:
    raise RuntimeError("charge failed for {CARD_TOKEN} with key {API_KEY}")
except RuntimeError:
    log.exception("charge.crashed")
"""


def _run(program: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=True,
    )
    return done.stderr


def test_no_secret_reaches_the_output() -> None:
    output = _run(LEAKY_PROGRAM)
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 7
    for secret in SECRETS:
        assert secret not in output, f"{secret[:6]}... leaked"
    assert "Basic abc" not in output
    # Still useful: the kind of secret and everything else stays readable.
    by_event = {line["event"].split(" ")[0]: line for line in lines}
    assert by_event["auth.failed"]["authorization"] == "[redacted]"
    assert by_event["payment.request"]["body"] == {"payment_method": "[redacted]", "amount": 1250}
    assert by_event["webhook.configured"]["idempotency_key"] == "order-1"
    assert "whsec_[redacted]" in by_event["webhook.configured"]["event"]
    assert by_event["provider"]["event"] == "provider said: bad key sk_[redacted]"
    assert by_event["card"]["event"] == "card pm_[redacted] declined"
    crash = by_event["charge.crashed"]
    assert (
        "RuntimeError: charge failed for pm_[redacted] with key sk_[redacted]"
        in (crash["exception"])
    )


def test_stdlib_loggers_come_out_as_the_same_json() -> None:
    output = _run(
        """
        import logging, structlog
        from config.logging import configure_logging
        configure_logging("INFO", "auto")
        structlog.get_logger("api").info("ours", n=1)
        for name in ("temporalio.worker", "uvicorn.error", "sqlalchemy.engine"):
            logging.getLogger(name).warning("theirs")
        logging.getLogger("httpx").info("one line per HTTP call: dropped")
        """
    )
    lines = [json.loads(line) for line in output.splitlines()]
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("api", "ours"),
        ("temporalio.worker", "theirs"),
        ("uvicorn.error", "theirs"),
        ("sqlalchemy.engine", "theirs"),
    ]
    assert all({"timestamp", "level"} <= line.keys() for line in lines)


def test_canonical_lines_go_without_the_logger_name_and_times_to_the_millisecond() -> None:
    output = _run(
        """
        import structlog
        from config.logging import configure_logging
        configure_logging("INFO", "json")
        structlog.get_logger("api").info("http.request", status=201)
        structlog.get_logger("activity").info("activity.attempt", outcome="completed")
        structlog.get_logger("api").info("http.requests_shed", total=3)
        """
    )
    lines = [json.loads(line) for line in output.splitlines()]
    assert [(line["event"], line.get("logger")) for line in lines] == [
        ("http.request", None),
        ("activity.attempt", None),
        ("http.requests_shed", "api"),
    ]
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])


def _run_on_a_terminal(program: str, env: dict[str, str]) -> str:
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(program)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env={**os.environ, **env},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the child exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode()


TERMINAL_PROGRAM = """
import structlog
from config.logging import configure_logging
from config.settings import Settings
settings = Settings()
configure_logging("INFO", "auto", environment=settings.environment)
structlog.get_logger("api").info("payment.created", amount=1250)
"""


def test_a_terminal_gets_the_console_and_production_gets_json() -> None:
    console = _run_on_a_terminal(TERMINAL_PROGRAM, {"PAYMENTS_ENVIRONMENT": "development"})
    assert "payment.created" in console
    assert not console.lstrip().startswith("{")
    production = _run_on_a_terminal(
        TERMINAL_PROGRAM,
        {
            "PAYMENTS_ENVIRONMENT": "production",
            "PAYMENTS_PROVIDER_API_KEY": "sk_live_real_one",
            "PAYMENTS_PAYLOAD_KEYS": "k1:" + "A" * 43 + "=",
        },
    )
    assert json.loads(production.strip())["event"] == "payment.created"


def test_the_sdk_cores_own_lines_come_out_as_our_json() -> None:
    """The Rust core's lines (e.g. "workflow task duration exceeded 5 seconds" under
    load) are forwarded into the same chain, not printed as coloured console text."""
    output = _run(
        """
        import time
        from temporalio.runtime import Runtime, TelemetryConfig
        from activities.metrics import core_logging
        from config.logging import configure_logging

        configure_logging("INFO", "json")
        # The worker forwards WARN and above; INFO here, as the core's test hook
        # writes at INFO.
        runtime = Runtime(telemetry=TelemetryConfig(logging=core_logging("INFO")))
        runtime._core_runtime.write_test_info_log("core says hello", "sk_" + "x" * 40)
        time.sleep(0.5)  # forwarded lines are buffered for a few milliseconds
        runtime._core_runtime.write_test_info_log("flush", "")
        time.sleep(0.5)
        """
    )
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    core = [line for line in lines if "core says hello" in line["event"]]
    assert len(core) == 1, output
    assert core[0]["logger"] == "temporalio.core"
    assert core[0]["core_target"]
    assert "temporal_log" not in core[0]
    assert core[0]["level"] == "info"
    assert "x" * 40 not in output, "the core's fields pass the secret masking too"
    assert "\x1b[" not in output, "no console colour codes"
