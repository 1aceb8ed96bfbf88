"""examples/executor.py, run as its own process against a service on a real port.

The service is the in-process test server (auth on, through the `users` fixture); the
executor is a child process with alice's key, running `python job.py` (written below)
with each job's parameters. Every wait is bounded; no figure depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Client, Users, create_deployment, create_job

ROOT = Path(__file__).resolve().parent.parent
EXECUTOR = ROOT / "examples" / "executor.py"
BOUND_S = 60.0  # longer than this is a hang, however busy the machine
LEASE_S = 5  # the shortest lease: a heartbeat every 1.7 s

# The command the executor runs; a job's parameters are its arguments.
JOB_SCRIPT = """\
import argparse, os, signal, sys, time

parser = argparse.ArgumentParser()
parser.add_argument("--say", default="")
parser.add_argument("--exit", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--pid-file")
args = parser.parse_args()


def on_term(signum, frame):
    print("got SIGTERM", flush=True)
    sys.exit(143)


signal.signal(signal.SIGTERM, on_term)
print(args.say, flush=True)
print("to stderr", file=sys.stderr, flush=True)
if args.pid_file:
    with open(args.pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(args.pid_file + ".tmp", args.pid_file)
time.sleep(args.sleep)
sys.exit(args.exit)
"""


class Executor:
    """One examples/executor.py process and the file its log goes to."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc, self.log = proc, log

    async def exit_code(self) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), BOUND_S)
        except TimeoutError:
            pytest.fail(f"the executor did not exit:\n{self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text()

    async def logged(self, text: str) -> None:
        """Until the executor's log says `text` (a signal handled, for example)."""
        deadline = time.monotonic() + BOUND_S
        while text not in self.output():
            assert time.monotonic() < deadline, f"not logged: {text}\n{self.output()}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def executor(users: Users, tmp_path: Path, *options: str) -> AsyncIterator[Executor]:
    script, log = tmp_path / "job.py", tmp_path / "executor.log"
    script.write_text(JOB_SCRIPT)
    url = str(users.alice.server.make_url(""))
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, str(EXECUTOR), "--url", url, "--executor", "ex-test"),
            *("--command", f"{sys.executable} {script}", "--lease-s", str(LEASE_S)),
            *options,
            stdout=out,
            stderr=out,
            env={**os.environ, "API_KEY": users.keys["alice"]},
        )
    try:
        yield Executor(proc, log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def job(client: Client, job_id: int) -> dict[str, Any]:
    resp = await client.get(f"/jobs/{job_id}")
    assert resp.status == 200
    result: dict[str, Any] = await resp.json()
    return result


async def until(client: Client, job_id: int, *statuses: str) -> dict[str, Any]:
    """The job, once its task_status is one of `statuses` (within BOUND_S)."""
    deadline = time.monotonic() + BOUND_S
    while (got := await job(client, job_id))["task_status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stayed {got['task_status']}"
        await asyncio.sleep(0.1)
    return got


def read_pid(path: Path) -> int | None:
    return int(path.read_text()) if path.exists() else None


async def pid_from(path: Path) -> int:
    """The pid the command wrote once it started (within BOUND_S)."""
    deadline = time.monotonic() + BOUND_S
    while (pid := read_pid(path)) is None:
        assert time.monotonic() < deadline, "the command did not start"
        await asyncio.sleep(0.1)
    return pid


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


async def output_file(client: Client, job_id: int) -> tuple[dict[str, Any], str]:
    """The job's one result (output.txt): its entry and its text."""
    got = await job(client, job_id)
    assert [r["name"] for r in got["results"]] == ["output.txt"], got["results"]
    resp = await client.get(f"/jobs/{job_id}/results/output.txt")
    assert resp.status == 200
    return got["results"][0], await resp.text()


async def test_runs_jobs_reports_them_and_stops_on_sigterm(users: Users, tmp_path: Path) -> None:
    alice, bob = users.alice, users.bob
    dep = await create_deployment(alice)
    ok = await create_job(alice, dep["deployment_id"], parameters="--say hello")
    failing = await create_job(alice, dep["deployment_id"], parameters="--say 'oh no' --exit 3")
    bobs_dep = await create_deployment(bob, user_id="bob")
    bobs = await create_job(bob, bobs_dep["deployment_id"], user_id="bob")

    async with executor(users, tmp_path, "--wait-s", "1") as ex:
        done = await until(alice, ok["job_id"], "FINISHED", "ERROR")
        failed = await until(alice, failing["job_id"], "FINISHED", "ERROR")
        ex.proc.send_signal(signal.SIGTERM)  # it is waiting in a claim now: it stops
        assert await ex.exit_code() == 0, ex.output()
    assert "SIGTERM: finishing the job at hand" in ex.output()

    assert done["task_status"] == "FINISHED" and done["status_reason"] is None, ex.output()
    assert done["lease"] is None
    assert done["history"][1]["executor"] == "ex-test"
    entry, text = await output_file(alice, ok["job_id"])
    assert text == "hello\nto stderr\n"
    assert entry["content_type"] == "text/plain"
    assert entry["metadata"] == {"executor": "ex-test", "exit_code": 0}

    assert failed["task_status"] == "ERROR" and failed["status_reason"] == "exit code 3"
    assert failed["history"][-1]["reason"] == "exit code 3"
    entry, text = await output_file(alice, failing["job_id"])
    assert text == "oh no\nto stderr\n" and entry["metadata"]["exit_code"] == 3

    assert (await job(bob, bobs["job_id"]))["task_status"] == "PENDING"  # not alice's


async def test_a_cancel_terminates_the_command(users: Users, tmp_path: Path) -> None:
    alice, pid_file = users.alice, tmp_path / "pid"
    dep = await create_deployment(alice)
    params = f"--say started --sleep 120 --pid-file {pid_file}"
    running = await create_job(alice, dep["deployment_id"], parameters=params)

    async with executor(users, tmp_path, "--once", "--wait-s", "10") as ex:
        pid = await pid_from(pid_file)
        assert (await job(alice, running["job_id"]))["task_status"] == "RUNNING"
        resp = await alice.post(f"/jobs/{running['job_id']}/cancel", json={"reason": "not needed"})
        assert resp.status == 202
        assert await ex.exit_code() == 0, ex.output()

    assert not alive(pid)  # terminated, not left running
    got = await job(alice, running["job_id"])
    assert got["task_status"] == "ERROR", ex.output()
    assert got["status_reason"] == "cancelled: not needed"
    _, text = await output_file(alice, running["job_id"])
    assert text == "started\nto stderr\ngot SIGTERM\n"  # SIGTERM first, and what it printed


async def test_a_lost_lease_kills_the_command_and_reports_nothing(
    users: Users, tmp_path: Path
) -> None:
    alice, pid_file = users.alice, tmp_path / "pid"
    dep = await create_deployment(alice)
    params = f"--say started --sleep 120 --pid-file {pid_file}"
    running = await create_job(alice, dep["deployment_id"], parameters=params)

    async with executor(users, tmp_path, "--once", "--wait-s", "10") as ex:
        pid = await pid_from(pid_file)
        # Someone else ends the job: the next heartbeat is 409.
        resp = await alice.patch(
            f"/jobs/{running['job_id']}", json={"task_status": "ERROR", "status_reason": "mine"}
        )
        assert resp.status == 200
        ended = await resp.json()
        assert await ex.exit_code() == 0, ex.output()

    assert not alive(pid)
    assert "lease lost (409" in ex.output()
    assert await job(alice, running["job_id"]) == ended  # no upload, no PATCH after it


async def test_sigterm_finishes_the_job_and_a_second_abandons_it(
    users: Users, tmp_path: Path
) -> None:
    alice, pid_file = users.alice, tmp_path / "pid"
    dep = await create_deployment(alice)
    params = f"--say started --sleep 120 --pid-file {pid_file}"
    running = await create_job(alice, dep["deployment_id"], parameters=params)
    waiting = await create_job(alice, dep["deployment_id"])

    async with executor(users, tmp_path, "--wait-s", "1") as ex:
        pid = await pid_from(pid_file)
        ex.proc.send_signal(signal.SIGTERM)
        await ex.logged("SIGTERM: finishing the job at hand")
        await asyncio.sleep(LEASE_S / 3 + 0.5)  # a heartbeat later: still running
        assert alive(pid) and ex.proc.returncode is None
        assert (await job(alice, running["job_id"]))["task_status"] == "RUNNING"
        ex.proc.send_signal(signal.SIGTERM)  # again: give it up
        assert await ex.exit_code() == 0, ex.output()

    assert not alive(pid)
    got = await job(alice, running["job_id"])
    assert got["task_status"] == "ERROR" and got["status_reason"] == "executor stopped"
    _, text = await output_file(alice, running["job_id"])
    assert text.endswith("got SIGTERM\n")
    assert (await job(alice, waiting["job_id"]))["task_status"] == "PENDING"  # not claimed


async def test_once_without_a_job_exits_after_wait_s(users: Users, tmp_path: Path) -> None:
    async with executor(users, tmp_path, "--once", "--wait-s", "0.5") as ex:
        assert await ex.exit_code() == 0, ex.output()
    assert "stopped" in ex.output()
