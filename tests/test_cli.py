"""`python -m service import` and `export` against the test server."""

from __future__ import annotations

import asyncio
import gzip
import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from service.__main__ import main
from service.cli import export_file, import_file
from tests.helpers import Client, create_deployment, create_job
from tests.test_imports import export, job_record, ndjson, other_client, records

__all__ = ["other_client"]  # the fixture, used here too

MERGE = {"Content-Type": "application/merge-patch+json"}


def url_of(client: Client) -> str:
    return str(client.make_url(""))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_failed_lines_go_to_an_errors_file_to_fix_and_import(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "deployments.ndjson"
    source.write_bytes(
        b'{"user_id": "a"}\n{"user_id": ""}\n{"user_id": "b"}\n{"user_id": \n{"user_id": "c"}'
    )
    assert await import_file(url_of(client), "deployments", str(source)) == 1
    out, err = capsys.readouterr()
    report = orjson.loads(out)
    assert (report["received"], report["inserted"], report["failed"]) == (5, 3, 2)
    assert "3 inserted" in err and "2 failed" in err
    assert "line 2: user_id: String should have at least 1 character" in err
    errors_file = tmp_path / "deployments.ndjson.errors.ndjson"
    assert errors_file.read_bytes() == b'{"user_id": ""}\n{"user_id": \n'

    errors_file.write_bytes(b'{"user_id": "d"}\n{"user_id": "e"}\n')  # fixed by hand
    assert await import_file(url_of(client), "deployments", str(errors_file)) == 0
    assert not (tmp_path / "deployments.ndjson.errors.ndjson.errors.ndjson").exists()
    users = [d["user_id"] for d in records(await export(client, "deployments"))]
    assert users == ["a", "b", "c", "d", "e"]


async def test_gzip_files_round_trip(client: Client, other_client: Client, tmp_path: Path) -> None:
    dep = await create_deployment(client, data={"x": [1, 2.5]})
    job = await create_job(client, dep["deployment_id"], job_name="j")
    await client.patch(f"/jobs/{job['job_id']}", json={"task_status": "RUNNING"}, headers=MERGE)
    await create_job(client, dep["deployment_id"])
    for kind in ("deployments", "jobs"):
        path = tmp_path / f"{kind}.ndjson.gz"
        assert await export_file(url_of(client), kind, [], str(path)) == 0
        assert not (tmp_path / f"{kind}.ndjson.gz.part").exists()
        assert await import_file(url_of(other_client), kind, str(path)) == 0
        assert gzip.decompress(path.read_bytes()) == await export(client, kind)
        assert await export(other_client, kind) == await export(client, kind)


async def test_standard_input_and_output(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    stdin = io.TextIOWrapper(io.BytesIO(b'{"user_id": "a"}\nbad\n{"user_id": "b"}\n'))
    stdout = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr("sys.stdin", stdin)
    monkeypatch.setattr("sys.stdout", stdout)
    assert await import_file(url_of(client), "deployments", "-") == 1
    assert (tmp_path / "stdin.errors.ndjson").read_bytes() == b"bad\n"
    stdout.flush()
    stdout.buffer.seek(0)
    stdout.buffer.truncate()
    assert await export_file(url_of(client), "deployments", [("user_id", "b")], "-") == 0
    stdout.flush()
    assert isinstance(stdout.buffer, io.BytesIO)
    (only,) = records(stdout.buffer.getvalue())
    assert only["user_id"] == "b"


async def test_the_commands_from_the_command_line(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = url_of(client)
    deps = tmp_path / "deps.ndjson"
    deps.write_bytes(ndjson([{"deployment_id": 1, "user_id": "a"}]))
    jobs = tmp_path / "jobs.ndjson"
    jobs.write_bytes(ndjson([job_record(1, 1), job_record(2, 1, user_id="bob"), job_record(3, 1)]))

    async def cli(*argv: str) -> int:
        return await asyncio.to_thread(main, list(argv))  # a loop of its own, as in a shell

    assert await cli("import", str(deps), "--kind", "deployments", "--url", url) == 0
    assert await cli("import", str(jobs), "--kind", "jobs", "--url", url) == 0
    rc = await cli("import", str(jobs), "--kind", "jobs", "--url", url, "--on-conflict", "skip")
    assert rc == 0
    assert orjson.loads(capsys.readouterr().out.splitlines()[-1])["skipped"] == 3
    errors = tmp_path / "errors.ndjson"
    rc = await cli(
        "import", str(jobs), "--kind", "jobs", "--url", url, "--errors-file", str(errors)
    )
    assert rc == 1
    assert errors.read_bytes() == jobs.read_bytes()  # each already exists

    out = tmp_path / "bob.ndjson"
    argv = ["export", "--kind", "jobs", "--url", url, "--user-id", "bob", "-o", str(out)]
    assert await cli(*argv) == 0
    assert [j["job_id"] for j in records(out.read_bytes())] == [2]
    argv = ["export", "--kind", "jobs", "--url", url, "--task-status", "PENDING", "-o", str(out)]
    assert await cli(*argv, "--task-status", "RUNNING") == 0
    assert len(records(out.read_bytes())) == 3

    capsys.readouterr()
    argv = ["export", "--kind", "deployments", "--url", url, "--deployment-id", "1"]
    assert await cli(*argv, "-o", str(out)) == 2
    assert "export failed: 400 query parameter 'deployment_id'" in capsys.readouterr().err
    assert len(records(out.read_bytes())) == 3  # the old file is left alone


async def test_progress_on_a_terminal(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "d.ndjson"
    source.write_bytes(ndjson({"user_id": f"u{n}"} for n in range(3000)))
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("service.cli.CHUNK", 4096)  # many small chunks
    monkeypatch.setattr("service.cli.Progress.INTERVAL_S", 0.0)
    assert await import_file(url_of(client), "deployments", str(source)) == 0
    shown = terminal.getvalue()
    assert "\r3,000 rows sent, " in shown and "rows/s" in shown
    assert "3,000 received, 3,000 inserted" in shown


async def test_failures_say_why_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], aiohttp_server: Any
) -> None:
    assert await import_file("http://127.0.0.1:9", "jobs", str(tmp_path / "missing")) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "x.ndjson").write_bytes(b"{}\n")
    assert await import_file("http://127.0.0.1:9", "jobs", str(tmp_path / "x.ndjson")) == 2
    assert "import failed" in capsys.readouterr().err
    out = tmp_path / "out.ndjson"
    assert await export_file("http://127.0.0.1:9", "jobs", [], str(out)) == 2
    assert not out.exists()

    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"job_id": 1}\n' * 100)
        assert request.transport is not None
        request.transport.close()  # as the service does when the database fails mid-export
        return response

    app = web.Application()
    app.router.add_get("/export/jobs", broken)
    server = await aiohttp_server(app)
    assert await export_file(str(server.make_url("")), "jobs", [], str(out)) == 2
    assert "export failed after" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.ndjson.part").exists()
