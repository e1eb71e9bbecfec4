"""Charges, refunds and stored idempotent responses, in SQLite (a file keeps them
across restarts; ``:memory:`` for throwaway runs)."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL,
    failure_code TEXT,
    amount_refunded INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refunds (
    id TEXT PRIMARY KEY,
    charge_id TEXT NOT NULL REFERENCES charges(id),
    idempotency_key TEXT NOT NULL UNIQUE,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotent_responses (
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
);
CREATE TABLE IF NOT EXISTS requests (
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
);
"""


@dataclass(frozen=True)
class StoredResponse:
    fingerprint: str
    status_code: int
    body: dict[str, Any]


class SandboxStore:
    """Thread-safe: one connection, one lock; every call is a short transaction."""

    def __init__(self, path: str | None) -> None:
        self._db = sqlite3.connect(
            path or ":memory:", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def count_request(self, scope: str, key: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO requests VALUES (?, ?, 1) ON CONFLICT (scope, idempotency_key) "
                "DO UPDATE SET count = count + 1",
                (scope, key),
            )

    def stored_response(self, scope: str, key: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, status_code, body FROM idempotent_responses "
                "WHERE scope = ? AND idempotency_key = ?",
                (scope, key),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(row["fingerprint"], row["status_code"], json.loads(row["body"]))

    def insert_charge(
        self, charge: dict[str, Any], fingerprint: str, status_code: int, body: dict[str, Any]
    ) -> None:
        """Store the charge and the response the key will replay, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO charges (id, idempotency_key, amount, currency, payment_method, "
                    "description, status, failure_code, amount_refunded, created) "
                    "VALUES (:id, :idempotency_key, :amount, :currency, :payment_method, "
                    ":description, :status, :failure_code, 0, :created)",
                    charge,
                )
                self._store_response(
                    "charge", charge["idempotency_key"], fingerprint, status_code, body
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def store_response(
        self, scope: str, key: str, fingerprint: str, status_code: int, body: dict[str, Any]
    ) -> None:
        with self._lock:
            self._store_response(scope, key, fingerprint, status_code, body)

    def _store_response(
        self, scope: str, key: str, fingerprint: str, status_code: int, body: dict[str, Any]
    ) -> None:
        self._db.execute(
            "INSERT INTO idempotent_responses VALUES (?, ?, ?, ?, ?)",
            (scope, key, fingerprint, status_code, json.dumps(body)),
        )

    def charge(self, charge_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM charges WHERE id = ?", (charge_id,)).fetchone()
        return None if row is None else dict(row)

    def charge_by_key(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM charges WHERE idempotency_key = ?", (key,)
            ).fetchone()
        return None if row is None else dict(row)

    def insert_refund(self, refund: dict[str, Any], fingerprint: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO refunds (id, charge_id, idempotency_key, amount, currency, "
                    "status, created) VALUES (:id, :charge_id, :idempotency_key, :amount, "
                    ":currency, :status, :created)",
                    refund,
                )
                self._db.execute(
                    "UPDATE charges SET amount_refunded = amount_refunded + ? WHERE id = ?",
                    (refund["amount"], refund["charge_id"]),
                )
                self._store_response("refund", refund["idempotency_key"], fingerprint, 200, body)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def stats(self) -> dict[str, Any]:
        with self._lock:
            charges = self._db.execute(
                "SELECT idempotency_key, COUNT(*) AS n, SUM(amount) AS total FROM charges "
                "WHERE status = 'succeeded' GROUP BY idempotency_key"
            ).fetchall()
            requests = self._db.execute(
                "SELECT idempotency_key, count FROM requests WHERE scope = 'charge'"
            ).fetchall()
            refunds = self._db.execute(
                "SELECT charge_id, COUNT(*) AS n, SUM(amount) AS total FROM refunds "
                "GROUP BY charge_id"
            ).fetchall()
        return {
            "charges_by_key": {row["idempotency_key"]: row["n"] for row in charges},
            "charge_requests_by_key": {row["idempotency_key"]: row["count"] for row in requests},
            "refunds_by_charge": {
                row["charge_id"]: {"count": row["n"], "amount": row["total"]} for row in refunds
            },
            "total_charges": sum(row["n"] for row in charges),
            "total_charged_amount": sum(row["total"] for row in charges),
        }

    def reset(self) -> None:
        with self._lock:
            self._db.executescript(
                "DELETE FROM refunds; DELETE FROM charges; DELETE FROM idempotent_responses; "
                "DELETE FROM requests;"
            )
