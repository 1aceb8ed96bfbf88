"""The embedded database: SecantusDB's `secantusd-py` as a child process of the service.

It is started as a separate process and spoken to over the MongoDB wire protocol only: it
is never imported (it is GPL-2.0 and an optional extra), so the service behaves the same
against it and against a real MongoDB. The blocking helpers at the end start one for the
tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)

Doc = dict[str, Any]


# secantusd-py remembers every retryable write (30 minutes, up to 10,000) and scans them on
# each write: with retryable writes on, inserts fell from ~700/s to ~110/s as they piled
# up (~1,200/s steady with them off). A local process has no failover for a retry to cover.
LOCAL_URL_OPTIONS = "directConnection=true&retryWrites=false"


PORT_FILE = "secantusd.port"  # in DATA_DIR while the embedded server runs
LOCK_FILE = "service.lock"  # in DATA_DIR: flock'ed by the process running its database
PID_FILE = "secantusd.pid"  # in DATA_DIR: the database child, left behind by a kill -9


class EmbeddedDatabaseError(RuntimeError):
    """The embedded database could not be started (missing, locked, crashed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_secantusd() -> str:
    """The daemon lives next to the interpreter in a venv, else on PATH."""
    beside = Path(sys.executable).with_name("secantusd-py")
    found = str(beside) if beside.exists() else shutil.which("secantusd-py")
    if not found:
        raise EmbeddedDatabaseError(
            "MONGODB_URL is unset and the embedded database (secantusd-py) is not installed: "
            "pip install 'jobservice[embedded]' or set MONGODB_URL."
        )
    return found


async def wait_until_ready(url: str, timeout_s: float, proc: asyncio.subprocess.Process) -> None:
    """Ping until the server answers; fail fast when the child process has died."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(url, serverSelectionTimeoutMS=500)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            if proc.returncode is not None:
                raise EmbeddedDatabaseError(
                    f"the embedded database exited with code {proc.returncode} at start "
                    "(see secantusd.log in DATA_DIR)"
                )
            with contextlib.suppress(Exception):
                await client.admin.command("ping")
                return
            if asyncio.get_running_loop().time() > deadline:
                raise EmbeddedDatabaseError(f"the embedded database did not answer in {timeout_s}s")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


@dataclass
class EmbeddedDatabase:
    """The running embedded server: where it listens, and whether it is still alive."""

    url: str
    proc: asyncio.subprocess.Process
    data_dir: Path

    @property
    def exit_code(self) -> int | None:
        """None while it runs; its exit code once it has exited."""
        return self.proc.returncode


async def watch_embedded(embedded: EmbeddedDatabase) -> None:
    """Say clearly, once, when the embedded server dies under the running service."""
    code = await embedded.proc.wait()
    log.error(
        "the embedded database (secantusd-py, pid %d) exited with code %d: requests get 503 "
        "until the service is restarted; its data in %s is kept (see secantusd.log there)",
        embedded.proc.pid,
        code,
        embedded.data_dir,
        extra={"embedded_pid": embedded.proc.pid, "exit_code": code},
    )


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a function that makes a forked child get SIGTERM when the service dies.

    Without it, a service killed with SIGKILL (the OOM killer, `kill -9`) leaves the
    database running and holding DATA_DIR, and the next `make run` cannot open it. libc's
    prctl is looked up here, before any fork, so the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


DIE_WITH_PARENT = _die_with_parent()


def lock_data_dir(data_dir: Path) -> int:
    """Take DATA_DIR for this process, or fail at once naming the process that has it.

    A kernel lock (flock) rather than a pid file alone: it goes with its process however
    that dies, so after a kill -9 it is free at once, and a stale pid is never believed.
    The file descriptor is not inherited, so the database child does not hold it.
    """
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EmbeddedDatabaseError(
            f"{data_dir} is in use by another service process (pid {holder}: `serve` or a "
            "command with its own embedded database); stop it or use another DATA_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def previous_database(data_dir: Path) -> int | None:
    """The pid of a database child a killed service left running on `data_dir`, if any.

    When a service is killed (kill -9, the OOM killer), its child gets SIGTERM (parent-death
    signal) and closes its files cleanly, which under load takes seconds: until then it
    holds WiredTiger's lock on them. Only called with DATA_DIR locked, so no live service
    owns it; the command line is checked in case the pid was reused.
    """
    try:
        pid = int((data_dir / PID_FILE).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, ValueError, IndexError):
        return None  # no pid file, not running, or not Linux
    is_ours = any(arg.endswith(b"secantusd-py") for arg in cmdline) and (
        str(data_dir / "db").encode() in cmdline
    )
    return pid if is_ours and state != "Z" else None  # a zombie holds no files


async def wait_for_previous_database(data_dir: Path, deadline: float) -> None:
    """Wait until the database child of a killed service has exited (see above)."""
    pid = previous_database(data_dir)
    if pid is None:
        return
    # Not signalled again: it had SIGTERM from the kernel, and a second one would re-enter
    # its handler in the middle of closing its files.
    log.warning(
        "waiting for the previous embedded database (secantusd-py, pid %d) to exit: "
        "its service was killed and it still holds %s",
        pid,
        data_dir,
        extra={"previous_embedded_pid": pid},
    )
    loop, started = asyncio.get_running_loop(), asyncio.get_running_loop().time()
    while previous_database(data_dir) == pid:
        if loop.time() > deadline:
            raise EmbeddedDatabaseError(
                f"the previous embedded database (secantusd-py, pid {pid}) still holds "
                f"{data_dir} after {loop.time() - started:.0f}s"
            )
        await asyncio.sleep(0.1)
    log.info(
        "the previous embedded database (pid %d) exited after %.1fs", pid, loop.time() - started
    )


def local_url(port: int, journal: bool = False) -> str:
    """A secantusd-py on this machine's loopback (`journal`: writes acknowledged once logged)."""
    return f"mongodb://127.0.0.1:{port}/?{LOCAL_URL_OPTIONS}" + ("&journal=true" if journal else "")


@contextlib.asynccontextmanager
async def embedded_server(
    data_dir: Path, timeout_s: float, journal: bool = True
) -> AsyncIterator[EmbeddedDatabase]:
    """Run `secantusd-py` on a free loopback port with its files in `data_dir`.

    While it runs, a background task watches it and logs an error if it exits; on the way
    out it is stopped with SIGTERM (so it closes its files cleanly), SIGKILL after 15 s.
    DATA_DIR stays locked by this process meanwhile. Waiting at start for the database of
    a killed service to exit counts against `timeout_s`.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, at start)
    lock_fd = lock_data_dir(data_dir)
    try:
        await wait_for_previous_database(data_dir, deadline)
        # At least a moment to answer, even when the wait took nearly all of it.
        remaining = max(deadline - asyncio.get_running_loop().time(), 1.0)
        async with _run_server(data_dir, remaining, journal) as embedded:
            yield embedded
    finally:
        os.close(lock_fd)  # releases the lock


@contextlib.asynccontextmanager
async def _run_server(
    data_dir: Path, timeout_s: float, journal: bool
) -> AsyncIterator[EmbeddedDatabase]:
    port = free_port()
    log_file = (data_dir / "secantusd.log").open("ab")
    # The port is chosen per start; storage persists across restarts.
    proc = await asyncio.create_subprocess_exec(
        find_secantusd(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage-path",
        str(data_dir / "db"),
        "--log-level",
        "WARNING",
        stdout=log_file,
        stderr=log_file,
        start_new_session=True,  # Ctrl-C reaches the service, which stops the child itself.
        preexec_fn=DIE_WITH_PARENT,
    )
    # journal=true: a write is acknowledged only once it is in the database's log, so an
    # acknowledged write survives the child dying (without it, the last ~second is lost).
    url = local_url(port, journal)
    port_file, pid_file = data_dir / PORT_FILE, data_dir / PID_FILE
    embedded = EmbeddedDatabase(url, proc, data_dir)
    watcher: asyncio.Task[None] | None = None
    try:
        pid_file.write_text(f"{proc.pid}\n")  # for the next start, after a kill -9
        await wait_until_ready(embedded.url, timeout_s, proc)
        port_file.write_text(f"{port}\n")  # for `keys` commands
        log.info(
            "embedded database (SecantusDB secantusd-py, pid %d) on port %d, files in %s",
            proc.pid,
            port,
            data_dir,
            extra={"embedded_pid": proc.pid},
        )
        watcher = asyncio.create_task(watch_embedded(embedded))
        yield embedded
    finally:
        port_file.unlink(missing_ok=True)
        if watcher is not None:
            watcher.cancel()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        pid_file.unlink(missing_ok=True)
        log_file.close()
        log.info("embedded database stopped (exit code %s)", proc.returncode)


def start_secantusd(port: int, storage_path: str, timeout_s: float = 60) -> subprocess.Popen[bytes]:
    """Start a `secantusd-py` on `port` and wait until it answers (blocking; killed if not)."""
    proc = subprocess.Popen(
        [find_secantusd(), "--host", "127.0.0.1", "--port", str(port)]
        + ["--storage-path", storage_path, "--log-level", "ERROR"],
    )
    deadline = time.monotonic() + timeout_s
    with MongoClient[Doc](local_url(port), serverSelectionTimeoutMS=500) as probe:
        while True:
            try:
                probe.admin.command("ping")
                return proc
            except PyMongoError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise EmbeddedDatabaseError("secantusd-py did not start") from None
                time.sleep(0.1)


@contextlib.contextmanager
def secantusd_process(storage_path: str, timeout_s: float = 60) -> Iterator[str]:
    """A `secantusd-py` for tests and benchmarks (blocking); yields its URL, stops it after.

    `storage_path=":memory:"` keeps nothing. The service itself uses `embedded_server`.
    """
    port = free_port()
    proc = start_secantusd(port, storage_path, timeout_s)
    try:
        yield local_url(port)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- commands that talk to the database themselves (keys, sweep-results) -------------------


async def running_embedded(data_dir: Path) -> str | None:
    """The URL of the embedded server a running service started on `data_dir`, if it answers."""
    try:
        port = int((data_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    url = local_url(port, journal=True)
    probe: AsyncMongoClient[Doc] = AsyncMongoClient(url, serverSelectionTimeoutMS=1000)
    try:
        await probe.admin.command("ping")
    except Exception:
        return None
    finally:
        await probe.close()
    return url
