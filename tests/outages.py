"""Private Redis and PostgreSQL instances for outage tests: stopping or restarting them disturbs
no other test (the shared stack's services are never touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from microgrid.stack import _pg_bindir, port_open
from tests.conftest import free_port, wait_for


class PrivateRedis:
    """A redis-server of our own on a free port, persisting like the stack's (append-only file),
    so a restart keeps the stream and clients resume exactly."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="microgrid-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def up(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server not installed"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ],
            stdout=(self.dir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: port_open(self.port), 20, f"private Redis on {self.port}")

    def down(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: Redis writes its append-only file and exits
            self.proc.wait(timeout=20)
            self.proc = None

    def remove(self) -> None:
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb in a temporary directory, run as `postgres` when
    we are root, as the stack does) on a free port, with the stack's role and a database."""

    user = password = "microgrid"
    dbname = "microgrid_outage"

    def __init__(self) -> None:
        self.port = free_port()
        self.bindir = _pg_bindir()
        # under /var/tmp: the `postgres` user cannot reach pytest's root-only temporary dirs
        self.home = Path(tempfile.mkdtemp(prefix="microgrid-pg-", dir="/var/tmp"))
        self.data, self.run_dir, self.log = (
            self.home / "data",
            self.home / "run",
            self.home / "pg.log",
        )
        self.run_dir.mkdir()
        self.log.touch()
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres", "postgres")
            shutil.chown(self.run_dir, "postgres", "postgres")
            shutil.chown(self.log, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.dbname}"

    def _as_owner(self, *cmd: str) -> None:
        args = list(cmd)
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        subprocess.run(args, check=True, capture_output=True, timeout=120)

    def _pg_ctl(self, *args: str) -> None:
        self._as_owner(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args
        )

    def up(self) -> None:
        self._as_owner(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "-U",
            "postgres",
        )
        self.start()
        admin = f"host={self.run_dir} port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
            conn.execute(f"CREATE DATABASE {self.dbname} OWNER {self.user}")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.run_dir} -c fsync=off"
        )
        self._pg_ctl("-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every open connection is cut (AdminShutdown)."""
        self._pg_ctl("-m", "fast", "-w", "-t", "60", "restart")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(self.home, ignore_errors=True)
