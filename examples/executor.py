"""A reference executor: claim a job, run a command for it, keep its lease alive, report.

    python examples/executor.py --url http://127.0.0.1:8080 --executor worker-1 \\
        --command "python3 simulate.py" [--api-key KEY | env API_KEY] \\
        [--deployment-id N] [--lease-s 60] [--wait-s 20] [--once]

What it runs: `--command` split like a shell would (shlex, no shell is started), followed
by the claimed job's `parameters` split the same way. With `--command "python3 sim.py"`
a job whose parameters are `--shots 1000` runs `python3 sim.py --shots 1000`. The job
picks only the arguments, never the program. Its stdout and stderr go together to one
file, uploaded at the end as the job's result `output.txt` (text/plain).

The loop (`--once`: one claim, then exit):

1. `POST /jobs/claim` with `wait_s`: the service holds the request until a job is due
   (200) or `--wait-s` passes (204, claim again).
2. Start the command. Every `lease_s / 3` seconds `POST /jobs/{id}/heartbeat` extends
   the lease (so two heartbeats may fail before it runs out). Pick `--lease-s` well
   under 3 x the service's CANCEL_GRACE_S (60 s by default), or a cancel is noticed
   only after the service has ended the job itself.
   - the heartbeat says `cancel_requested`: terminate the command (SIGTERM to its
     process group, SIGKILL if it is still there TERM_GRACE_S later), upload its output,
     PATCH ERROR with `status_reason` `cancelled: <the reason given>`;
   - the heartbeat answers 409 or 404 (the lease is gone: it expired, the job ended or
     was deleted, or it went to another executor), or no heartbeat got through before
     the lease ran out: kill the command and report nothing; the job is no longer ours.
3. The command exits: upload `output.txt`, then PATCH FINISHED (exit code 0) or ERROR
   with `status_reason` `exit code N` (`killed by signal NAME` if a signal ended it).

SIGTERM or SIGINT: stop claiming and **finish** the job at hand (keep heartbeating,
report it), then exit 0. A claim already waiting is let run to its answer (at most
`--wait-s`), since the service may hand it a job even after we stopped listening; a
job it brings is run like any other. A second SIGTERM/SIGINT **abandons** the job,
cleanly: the command is terminated, its output uploaded and the job made ERROR with
`status_reason` `executor stopped`, so that it does not sit RUNNING until its lease
expires. Either way nothing is left RUNNING behind us.

Every request has a time limit (REQUEST_TIMEOUT_S; a claim its `wait_s` on top);
network errors and 5xx answers are retried after a pause. A claim or heartbeat refused
with 401, 403 or 422 (a bad key or option) stops the executor with exit code 2; a
refused upload or PATCH is logged and the executor goes on. Exit code 1: with `--once`,
the claim got no answer.

Only aiohttp and the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import time
from typing import IO, Any

import aiohttp

REQUEST_TIMEOUT_S = 30.0  # one request, on top of a claim's wait_s
UPLOAD_TIMEOUT_S = 600.0  # one upload of output.txt
TERM_GRACE_S = 5.0  # from SIGTERM to SIGKILL of a command (at most lease_s / 3)
RETRY_PAUSE_S = 2.0  # after a failed claim or report
REPORT_ATTEMPTS = 3  # tries of an upload or a PATCH that fails on the network or a 5xx
OUTPUT_NAME = "output.txt"

log = logging.getLogger("executor")


class Fatal(Exception):
    """The service refused us for a reason retrying will not fix (key, body, version)."""


class Stop:
    """SIGTERM/SIGINT: the first stops claiming, the second abandons the job at hand."""

    def __init__(self) -> None:
        self.claiming = asyncio.Event()  # set: claim no more
        self.abandon = asyncio.Event()  # set: give the job at hand up now

    def received(self, signum: int) -> None:
        if self.claiming.is_set():
            log.warning("%s again: abandoning the job at hand", signal.Signals(signum).name)
            self.abandon.set()
        else:
            log.warning("%s: finishing the job at hand, then exiting", signal.Signals(signum).name)
            self.claiming.set()


class Service:
    """The few calls an executor makes, each bounded in time."""

    def __init__(self, http: aiohttp.ClientSession, url: str, executor: str) -> None:
        self.http, self.url, self.executor = http, url.rstrip("/"), executor

    async def call(
        self, method: str, path: str, timeout_s: float = REQUEST_TIMEOUT_S, **kwargs: Any
    ) -> tuple[int, Any]:
        """One request: its status and JSON body (None when it has none). Raises
        aiohttp.ClientError or TimeoutError when it did not get an answer."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self.http.request(method, self.url + path, timeout=timeout, **kwargs) as resp:
            body = await resp.read()
            if resp.status in (401, 403, 422):
                raise Fatal(f"{method} {path}: {resp.status} {body[:500]!r}")
            return resp.status, json.loads(body) if body else None

    async def claim(self, args: argparse.Namespace) -> dict[str, Any] | None:
        """A job we now hold the lease of, or None when none came within wait_s."""
        body: dict[str, Any] = {"executor": self.executor, "lease_s": args.lease_s}
        body["wait_s"] = args.wait_s
        if args.deployment_id is not None:
            body["deployment_id"] = args.deployment_id
        status, job = await self.call(
            "POST", "/jobs/claim", args.wait_s + REQUEST_TIMEOUT_S, json=body
        )
        if status == 200:
            return dict(job)
        if status == 204:
            return None
        raise aiohttp.ClientError(f"claim answered {status}: {job}")  # 5xx: try again

    async def heartbeat(self, job_id: int, lease_s: int) -> tuple[int, Any]:
        body = {"executor": self.executor, "lease_s": lease_s}
        return await self.call("POST", f"/jobs/{job_id}/heartbeat", json=body)

    async def report(
        self, what: str, method: str, path: str, file: IO[bytes] | None = None, **kwargs: Any
    ) -> int | None:
        """An upload (of `file`) or a PATCH, tried REPORT_ATTEMPTS times; its status, or
        None when no attempt got an answer below 500."""
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            if file is not None:  # aiohttp closes what it sent: send a copy each time
                kwargs["data"] = os.fdopen(os.dup(file.fileno()), "rb")
                kwargs["data"].seek(0)
            try:
                status, body = await self.call(method, path, **kwargs)
            except Fatal as exc:  # refused for good: say so and go on with the next job
                log.error("%s: %s", what, exc)
                return None
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, body = 0, repr(exc)
            if 0 < status < 500:
                if status >= 300:
                    log.warning("%s: %s %s", what, status, body)
                return status
            log.warning("%s failed (attempt %d): %s %s", what, attempt, status, body)
            if attempt < REPORT_ATTEMPTS:
                await asyncio.sleep(RETRY_PAUSE_S)
        return None

    async def upload(self, job_id: int, output: IO[bytes], exit_code: int | None) -> None:
        meta = json.dumps({"executor": self.executor, "exit_code": exit_code})
        headers = {"Content-Type": "text/plain", "X-Result-Metadata": meta}
        path = f"/jobs/{job_id}/results/{OUTPUT_NAME}"
        what = f"job {job_id}: upload {OUTPUT_NAME}"
        await self.report(what, "PUT", path, output, timeout_s=UPLOAD_TIMEOUT_S, headers=headers)

    async def end(self, job_id: int, status: str, reason: str | None) -> None:
        body: dict[str, Any] = {"task_status": status}
        if reason is not None:
            body["status_reason"] = reason
        done = await self.report(f"job {job_id}: {status}", "PATCH", f"/jobs/{job_id}", json=body)
        if done == 200:
            log.info("job %d: %s%s", job_id, status, f" ({reason})" if reason else "")

    async def cancel_reason(self, job_id: int) -> str:
        """The status_reason for a cancelled job: `cancelled: <reason>` as the service says."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, job = await self.call("GET", f"/jobs/{job_id}")
            if status == 200 and job.get("cancel_reason"):
                return f"cancelled: {job['cancel_reason']}"
        return "cancelled"


# --- one job ----------------------------------------------------------------------------


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (it has its own) and reap the command."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), REQUEST_TIMEOUT_S)


async def terminate(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the command's process group; SIGKILL it when still there after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace_s)
    await kill(proc)  # also whatever the command started and left behind in its group


def exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


async def supervise(
    svc: Service, job_id: int, proc: asyncio.subprocess.Process, lease_s: int, stop: Stop
) -> str:
    """Heartbeat while the command runs; what happened: exited, cancelled, abandoned or
    lost (then the command is already killed)."""
    every = lease_s / 3
    lease_until = time.monotonic() + lease_s  # from the claim; each heartbeat moves it on
    exited = asyncio.ensure_future(proc.wait())
    abandon = asyncio.ensure_future(stop.abandon.wait())
    try:
        while True:
            await asyncio.wait({exited, abandon}, timeout=every, return_when="FIRST_COMPLETED")
            if exited.done():
                return "exited"
            if abandon.done():
                await terminate(proc, min(TERM_GRACE_S, every))
                return "abandoned"
            sent = time.monotonic()
            try:
                status, beat = await svc.heartbeat(job_id, lease_s)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, beat = 0, repr(exc)
            if status == 200:
                lease_until = sent + lease_s
                if beat["cancel_requested"]:
                    log.info("job %d: cancel requested, terminating the command", job_id)
                    await terminate(proc, min(TERM_GRACE_S, every))
                    return "cancelled"
            elif status in (404, 409) or time.monotonic() >= lease_until:
                log.warning("job %d: lease lost (%s %s), killing the command", job_id, status, beat)
                await kill(proc)
                return "lost"
            else:
                log.warning("job %d: heartbeat failed (%s): %s", job_id, status, beat)
    finally:
        exited.cancel()
        abandon.cancel()
        if proc.returncode is None:  # an exception (or a cancel) got us here
            await kill(proc)


async def run_job(
    svc: Service, job: dict[str, Any], command: list[str], lease_s: int, stop: Stop
) -> None:
    job_id = job["job_id"]
    try:
        argv = command + shlex.split(job.get("parameters") or "")
    except ValueError as exc:  # e.g. an unclosed quote
        await svc.end(job_id, "ERROR", f"parameters: {exc}")
        return
    log.info("job %d: running %s", job_id, shlex.join(argv))
    with tempfile.TemporaryFile() as output:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, to terminate it whole
            )
        except OSError as exc:
            output.write(f"cannot start {argv[0]}: {exc}\n".encode())
            await svc.upload(job_id, output, None)
            await svc.end(job_id, "ERROR", f"cannot start: {exc.strerror or exc}")
            return
        what = await supervise(svc, job_id, proc, lease_s, stop)
        if what == "lost":
            return  # the job is someone else's now (or over): report nothing
        code = proc.returncode
        assert code is not None  # supervise() returns only once the command has exited
        await svc.upload(job_id, output, code)
        if what == "cancelled":
            await svc.end(job_id, "ERROR", await svc.cancel_reason(job_id))
        elif what == "abandoned":
            await svc.end(job_id, "ERROR", "executor stopped")
        elif code == 0:
            await svc.end(job_id, "FINISHED", None)
        else:
            await svc.end(job_id, "ERROR", exit_reason(code))


# --- the loop ---------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    stop = Stop()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.received, sig)
    command = shlex.split(args.command)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        svc = Service(http, args.url, args.executor)
        log.info("claiming jobs from %s as %r", args.url, args.executor)
        while not stop.claiming.is_set():
            try:
                job = await svc.claim(args)
            except Fatal as exc:
                log.error("%s", exc)
                return 2
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("claim failed: %r", exc)
                if args.once:
                    return 1
                with contextlib.suppress(TimeoutError):  # a pause that a signal cuts short
                    await asyncio.wait_for(stop.claiming.wait(), RETRY_PAUSE_S)
                continue
            if job is not None:
                try:
                    await run_job(svc, job, command, args.lease_s, stop)
                except Fatal as exc:
                    log.error("%s", exc)
                    return 2
            if args.once:
                break
    log.info("stopped")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8080")
    parser.add_argument("--executor", required=True, help="this executor's name (1-200 chars)")
    parser.add_argument(
        "--command", required=True, help="the program to run; the job's parameters follow it"
    )
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"), help="default: $API_KEY")
    parser.add_argument("--deployment-id", type=int, help="claim only this deployment's jobs")
    parser.add_argument("--lease-s", type=int, default=60, help="5-3600; heartbeats every third")
    parser.add_argument("--wait-s", type=float, default=20.0, help="0-60: how long a claim waits")
    parser.add_argument("--once", action="store_true", help="one claim (and its job), then exit")
    args = parser.parse_args(argv)
    if not 5 <= args.lease_s <= 3600:
        parser.error("--lease-s must be 5-3600")
    if not 0 <= args.wait_s <= 60:
        parser.error("--wait-s must be 0-60")
    if not shlex.split(args.command):
        parser.error("--command is empty")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(asyncio.run(main(parse_args())))
