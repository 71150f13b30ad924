"""The processes the fault suite kills: the platform's components (supervised as `microgrid run`
supervises them), and a single-node Kafka broker of the suite's own whose log directory is a
disk of its own, so that it can be filled.

The broker is `microgrid.stack.Kafka` with a stack directory and ports of its own. When the
machine lets an unprivileged user make a user and mount namespace (`unshare --user
--map-root-user --mount`), that stack directory is a tmpfs of `DISK_MB` mounted inside such a
namespace: a disk that only the broker sees, that filling harms nothing else, and that goes
away with the namespace. A process of ours (`sleep`) holds the namespace, and the broker is
started in it with `nsenter`; the suite reaches its files through `/proc/<holder>/root`.
Otherwise the broker's directory is an ordinary temporary directory and the disk-full scenario
is skipped.

PID 1 of a container may never reap orphans (this machine's does not): a killed PostgreSQL
postmaster or broker, orphaned when its starter exited, would stay a zombie, and a zombie's pid
looks alive to PostgreSQL's lock file check and to `stack.py`. `adopt_orphans` makes the test
process their subreaper, so that they are reaped here (`gone`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from microgrid.stack import Kafka, port_open
from microgrid.supervisor import HEALTHY_AFTER_S, MAX_BACKOFF_S
from runtime.settings import PROJECT_ROOT, Settings
from tests.conftest import free_port, wait_for

PR_SET_CHILD_SUBREAPER = 36
DISK_MB = 256


def adopt_orphans(adopt: bool = True) -> bool:
    """Become (or stop being) the subreaper of our descendants (Linux prctl); False where that
    is refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, int(adopt), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def gone(pid: int) -> bool:
    """The process has exited (reaped here if it was our child; a zombie counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def family(pid: int) -> list[int]:
    """The process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def kill_all(pids: list[int], timeout: float = 30) -> None:
    """SIGKILL every one of them at once and wait until each is gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(gone(p) for p in pids), timeout, f"pids {pids} to die")


# --- the broker --------------------------------------------------------------------------------

HOLD = (
    'mount -t tmpfs -o size={mb}m,mode=0755 microgrid-faults "$0" && mkdir -p "$0/kafka"'
    ' && ln -s "$1" "$0/kafka/libs" && exec sleep infinity'
)
UP = (
    "from microgrid.stack import Kafka; from runtime.settings import Settings;"
    " Kafka(Settings()).up()"
)


class PrivateBroker:
    """A single-node broker of our own, on free ports, under a stack directory of its own
    (`microgrid.stack.Kafka`, through its public API only)."""

    def __init__(self, heap: str = "512m") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="microgrid-faults-kafka-"))
        self.libs = Kafka(Settings()).libs  # the jars `make setup` resolved
        self.settings = Settings(
            kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
            kafka_controller_port=free_port(),
            kafka_tls_port=free_port(),
            kafka_tls=False,
            stack_dir=self.dir,
            kafka_heap=heap,
        )
        self.kafka = Kafka(self.settings)
        self.holder: subprocess.Popen[bytes] | None = None
        self.unconfined = ""  # why the log directory is not a disk of its own
        self._confine()

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka_bootstrap_servers

    def _confine(self) -> None:
        if not (shutil.which("unshare") and shutil.which("nsenter")):
            self.unconfined = "util-linux's unshare and nsenter are not installed"
        else:
            holder = subprocess.Popen(
                [
                    "unshare",
                    "--user",
                    "--map-root-user",
                    "--mount",
                    "sh",
                    "-c",
                    HOLD.format(mb=DISK_MB),
                    str(self.dir),
                    str(self.libs),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            libs = Path(f"/proc/{holder.pid}/root{self.dir}/kafka/libs")
            wait_for(lambda: holder.poll() is not None or libs.exists(), 20, "the broker's disk")
            if holder.poll() is None:
                self.holder = holder
            else:
                why = (holder.stderr.read() if holder.stderr else b"").decode(errors="replace")
                self.unconfined = (
                    "an unprivileged user cannot mount a tmpfs here (unshare --user"
                    f" --map-root-user --mount: {why.strip() or holder.returncode})"
                )
        if self.holder is None:
            (self.dir / "kafka").mkdir()
            (self.dir / "kafka" / "libs").symlink_to(self.libs)

    def view(self, path: Path) -> Path:
        """`path` as the broker sees it (inside its mount namespace, when it has one)."""
        return Path(f"/proc/{self.holder.pid}/root{path}") if self.holder else path

    def up(self) -> None:
        if self.holder is None:
            self.kafka.up()
            return
        env = {
            **os.environ,
            "STACK_DIR": str(self.dir),
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_CONTROLLER_PORT": str(self.settings.kafka_controller_port),
            "KAFKA_TLS_PORT": str(self.settings.kafka_tls_port),
            "KAFKA_TLS": "false",
            "KAFKA_HEAP": self.settings.kafka_heap,
        }
        done = subprocess.run(
            [
                *("nsenter", "-t", str(self.holder.pid), "-U", "-m", "--preserve-credentials"),
                *(sys.executable, "-c", UP),
            ],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]

    def pid(self) -> int | None:
        try:
            pid = int(self.view(self.kafka.pidfile).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return None if gone(pid) else pid

    def kill(self) -> None:
        """kill -9 the broker."""
        pid = self.pid()
        assert pid is not None, "the broker is not running"
        kill_all([pid])

    def wait_down(self, timeout: float) -> bool:
        """Wait up to `timeout` for the broker to exit by itself; whether it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() is None and not port_open(self.settings.kafka_port):
                return True
            time.sleep(0.1)
        return False

    def fill(self) -> int:
        """Fill the broker's disk to the last byte; the bytes written."""
        assert self.holder is not None, self.unconfined
        written, chunk = 0, b"\xa5" * (1 << 20)
        with self.view(self.dir / "filler").open("wb", buffering=0) as out:
            try:
                while True:
                    written += out.write(chunk) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return written

    def free(self) -> None:
        self.view(self.dir / "filler").unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        log = self.view(self.kafka.log)
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def remove(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not self.wait_down(30):
                kill_all([pid])
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the components ----------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    alias: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0


class Parts:
    """The platform's components, each a process of ours (`python -m microgrid.components
    NAME`), restarted when one exits by itself as `microgrid run` restarts it (after 1 s,
    doubling up to 30 s); a part this class kills or stops stays down until started again."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.members: dict[str, Member] = {}
        self.lock = threading.Lock()
        self.exited: list[tuple[str, int | None]] = []  # (alias, code) of unplanned exits
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def log(self, alias: str) -> Path:
        return self.log_dir / f"{alias}.log"

    def count(self, alias: str, marker: str) -> int:
        log = self.log(alias)
        return log.read_text(errors="replace").count(marker) if log.exists() else 0

    def _spawn(self, m: Member) -> None:
        with self.log(m.alias).open("ab") as out:
            m.proc = subprocess.Popen(
                [sys.executable, "-m", "microgrid.components", m.name],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                env={**os.environ, **self.env, **m.env},
            )
        m.started_at = time.monotonic()

    def start(self, name: str, alias: str | None = None, **env: str) -> None:
        m = Member(name, alias or name, env)
        with self.lock:
            assert m.alias not in self.members, f"{m.alias} is running"
            self._spawn(m)
            self.members[m.alias] = m

    def pid(self, alias: str) -> int:
        proc = self.members[alias].proc
        assert proc is not None
        return proc.pid

    def _take(self, alias: str) -> subprocess.Popen[bytes] | None:
        with self.lock:
            return self.members.pop(alias).proc

    def kill(self, alias: str) -> None:
        """kill -9 the part, every process of it at once (the gateway's workers too)."""
        proc = self._take(alias)
        if proc is not None:
            pids = family(proc.pid)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            wait_for(lambda: all(gone(p) for p in pids[1:]), 30, f"{alias}'s processes to die")

    def stop(self, *aliases: str, grace: float = 20) -> None:
        """SIGTERM the parts at once, and SIGKILL those still running after `grace`."""
        procs = [p for p in map(self._take, aliases) if p is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot stop
            proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def signal(self, alias: str, sig: signal.Signals) -> None:
        os.kill(self.pid(alias), sig)

    def stop_all(self) -> None:
        self._stop.set()
        self.stop(*self.members)

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self.lock:
                for m in self.members.values():
                    if m.proc is None:
                        if now >= m.next_start:
                            self._spawn(m)
                        continue
                    code = m.proc.poll()
                    if code is None:
                        if m.restarts and now - m.started_at > HEALTHY_AFTER_S:
                            m.restarts = 0
                        continue
                    self.exited.append((m.alias, code))
                    m.proc, m.next_start = None, now + min(MAX_BACKOFF_S, 2.0**m.restarts)
                    m.restarts += 1

    @staticmethod
    def healthy(url: str) -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
