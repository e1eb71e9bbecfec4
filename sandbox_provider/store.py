"""Charges, refunds, stored idempotent answers and received requests, in SQLite.

A file keeps them across restarts; without one they live in memory. Every
idempotent POST runs in one ``BEGIN IMMEDIATE`` transaction that looks up the
key's stored answer and, only if there is none, writes the effect and the answer
together: SQLite's write lock serialises same-key requests, even between two
processes sharing a file, and the UNIQUE keys refuse a second charge or refund
should anything slip past.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

Scope = Literal["charge", "refund"]

# Table and scope names are those of the first release, so a devstack data
# directory from before keeps replaying its stored answers.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')),
    failure_code TEXT,
    amount_refunded INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    CHECK (amount_refunded BETWEEN 0 AND amount)
);
CREATE TABLE IF NOT EXISTS refunds (
    id TEXT PRIMARY KEY,
    charge_id TEXT NOT NULL REFERENCES charges(id),
    idempotency_key TEXT NOT NULL UNIQUE,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS refunds_by_charge ON refunds (charge_id);
CREATE TABLE IF NOT EXISTS idempotent_responses (
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
);
CREATE TABLE IF NOT EXISTS received_requests (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS received_requests_by_key
    ON received_requests (scope, idempotency_key);
"""


@dataclass(frozen=True)
class Charge:
    id: str
    idempotency_key: str
    amount: int
    currency: str
    payment_method: str
    description: str | None
    status: Literal["succeeded", "failed"]
    failure_code: str | None
    amount_refunded: int
    created: int

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
            "payment_method": self.payment_method,
            "description": self.description,
            "idempotency_key": self.idempotency_key,
            "amount_refunded": self.amount_refunded,
            "failure_code": self.failure_code,
            "created": self.created,
        }


@dataclass(frozen=True)
class Refund:
    id: str
    charge_id: str
    idempotency_key: str
    amount: int
    currency: str
    status: Literal["succeeded"]
    created: int

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "refund",
            "charge": self.charge_id,
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
            "idempotency_key": self.idempotency_key,
            "created": self.created,
        }


@dataclass(frozen=True)
class StoredResponse:
    fingerprint: str
    status_code: int
    body: str


class Transaction:
    """The reads and writes of one idempotent request, inside its write transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def stored_response(self, scope: Scope, key: str) -> StoredResponse | None:
        row = self._db.execute(
            "SELECT fingerprint, status_code, body FROM idempotent_responses "
            "WHERE scope = ? AND idempotency_key = ?",
            (scope, key),
        ).fetchone()
        return None if row is None else StoredResponse(*row)

    def save_response(
        self, scope: Scope, key: str, fingerprint: str, status_code: int, body: str
    ) -> None:
        self._db.execute(
            "INSERT INTO idempotent_responses "
            "(scope, idempotency_key, fingerprint, status_code, body) VALUES (?, ?, ?, ?, ?)",
            (scope, key, fingerprint, status_code, body),
        )

    def insert_charge(self, charge: Charge) -> None:
        self._db.execute(
            "INSERT INTO charges (id, idempotency_key, amount, currency, payment_method, "
            "description, status, failure_code, amount_refunded, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                charge.id,
                charge.idempotency_key,
                charge.amount,
                charge.currency,
                charge.payment_method,
                charge.description,
                charge.status,
                charge.failure_code,
                charge.amount_refunded,
                charge.created,
            ),
        )

    def charge(self, charge_id: str) -> Charge | None:
        return _charge_or_none(self._db, "id", charge_id)

    def insert_refund(self, refund: Refund) -> None:
        # The handler has checked what remains; the guard makes over-refunding
        # impossible even if that check were ever wrong.
        updated = self._db.execute(
            "UPDATE charges SET amount_refunded = amount_refunded + ? "
            "WHERE id = ? AND status = 'succeeded' AND amount_refunded + ? <= amount",
            (refund.amount, refund.charge_id, refund.amount),
        ).rowcount
        if updated != 1:
            raise RuntimeError(f"refund {refund.id} does not fit charge {refund.charge_id}")
        self._db.execute(
            "INSERT INTO refunds (id, charge_id, idempotency_key, amount, currency, status, "
            "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                refund.id,
                refund.charge_id,
                refund.idempotency_key,
                refund.amount,
                refund.currency,
                refund.status,
                refund.created,
            ),
        )


class SandboxStore:
    """One connection behind one lock; every public method is one short transaction."""

    def __init__(self, path: str | None) -> None:
        self._db = sqlite3.connect(
            path or ":memory:", check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._lock = threading.Lock()
        with self._lock:
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
                # Durable across a crash of this process, which is what a restart test needs;
                # only a power cut could lose the last commits.
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record_request(self, scope: Scope, key: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO received_requests (scope, idempotency_key, received) VALUES (?, ?, ?)",
                (scope, key, time.time()),
            )

    def charge(self, charge_id: str) -> Charge | None:
        with self._lock:
            return _charge_or_none(self._db, "id", charge_id)

    def charge_by_key(self, key: str) -> Charge | None:
        with self._lock:
            return _charge_or_none(self._db, "idempotency_key", key)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            charges = self._db.execute(
                "SELECT idempotency_key, COUNT(*), SUM(amount) FROM charges "
                "WHERE status = 'succeeded' GROUP BY idempotency_key"
            ).fetchall()
            requests = self._db.execute(
                "SELECT idempotency_key, COUNT(*) FROM received_requests "
                "WHERE scope = 'charge' GROUP BY idempotency_key"
            ).fetchall()
            refunds = self._db.execute(
                "SELECT charge_id, COUNT(*), SUM(amount) FROM refunds GROUP BY charge_id"
            ).fetchall()
        return {
            "charges_by_key": {key: count for key, count, _ in charges},
            "charge_requests_by_key": dict(requests),
            "refunds_by_charge": {
                charge_id: {"count": count, "amount": amount}
                for charge_id, count, amount in refunds
            },
            "total_charges": sum(count for _, count, _ in charges),
            "total_charged_amount": sum(amount for _, _, amount in charges),
        }

    def listing(self) -> tuple[list[Charge], list[Refund]]:
        """Every charge and refund, for the audit's reconciliation."""
        with self._lock:
            charges = self._db.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges ORDER BY created, id"  # noqa: S608
            ).fetchall()
            refunds = self._db.execute(
                "SELECT id, charge_id, idempotency_key, amount, currency, status, created "
                "FROM refunds ORDER BY created, id"
            ).fetchall()
        return [Charge(*row) for row in charges], [Refund(*row) for row in refunds]

    def reset(self) -> None:
        with self._lock:
            self._db.executescript(
                "BEGIN IMMEDIATE; DELETE FROM refunds; DELETE FROM charges; "
                "DELETE FROM idempotent_responses; DELETE FROM received_requests; COMMIT;"
            )


_CHARGE_COLUMNS = (
    "id, idempotency_key, amount, currency, payment_method, description, status, "
    "failure_code, amount_refunded, created"
)


def _charge_or_none(
    db: sqlite3.Connection, column: Literal["id", "idempotency_key"], value: str
) -> Charge | None:
    row = db.execute(
        f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE {column} = ?",  # noqa: S608 - fixed names
        (value,),
    ).fetchone()
    return None if row is None else Charge(*row)
