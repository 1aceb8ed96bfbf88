"""Prometheus metrics, the series and how they are fed; served at `GET /metrics` (ops.py)
in the text format 0.0.4.

- HTTP: requests and their latency by method, route template and status (templates, never
  raw paths, keep the label set small);
- database: the latency of every command the driver sends, by command name and outcome
  (a pymongo `CommandListener` that `database.make_client` registers);
- jobs by status: `JOBS` and `DATABASE_UP`, set by ops.py when /metrics is scraped;
- executors: `CLAIMS`, `JOBS_ENDED_BY_SWEEPER` (lease expiries, cancels past their grace
  period) and `CANCELS`, counters fed by claims.py and jobs.py;
- import rows: `IMPORT_ROWS`, a counter the bulk import increments:
  `IMPORT_ROWS.labels(kind="jobs", outcome="inserted").inc(n)`, with `kind` one of
  `deployments`, `jobs` and `outcome` one of `inserted`, `replaced`, `skipped`, `failed`.

Metrics live in prometheus_client's default registry (one per process, like the process
metrics it adds), so several apps in one process (the tests) share them. A leaf module:
the modules that feed it import it, so it imports nothing of the service.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pymongo import monitoring

# No `*_created` series: they double the page and few dashboards use them.
disable_created_metrics()  # type: ignore[no-untyped-call]
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LABELS = ["method", "route", "status"]

HTTP_REQUESTS = Counter(
    "jobservice_http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    LABELS,
)
HTTP_DURATION = Histogram(
    "jobservice_http_request_duration_seconds",
    "Time from the request reaching the app to its answer, by method, route template, status.",
    LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HTTP_IN_FLIGHT = Gauge("jobservice_http_requests_in_flight", "Requests being handled now.")
DB_DURATION = Histogram(
    "jobservice_db_command_duration_seconds",
    "Database commands the driver sent, by command name and outcome (ok, error).",
    ["command", "outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS = Gauge("jobservice_jobs", "Jobs by task_status, counted at scrape time.", ["task_status"])
DATABASE_UP = Gauge(
    "jobservice_database_up", "1 when this scrape could count the jobs in the database, else 0."
)
IMPORT_ROWS = Counter(
    "jobservice_import_rows_total",
    "Rows received by bulk imports, by kind (deployments, jobs) and outcome "
    "(inserted, replaced, skipped, failed).",
    ["kind", "outcome"],
)
CLAIMS = Counter(
    "jobservice_claims_total", "Jobs handed to an executor by POST /jobs/claim (this instance)."
)
JOBS_ENDED_BY_SWEEPER = Counter(
    "jobservice_jobs_ended_by_sweeper_total",
    "RUNNING jobs this instance's sweeper made ERROR, by why (lease_expired, cancelled).",
    ["why"],
)
CANCELS = Counter(
    "jobservice_cancels_total",
    "POST /jobs/{id}/cancel that changed a job, by what it did (ended: a PENDING job is now "
    "ERROR; requested: a RUNNING job's executor is asked).",
    ["outcome"],
)
for _why in ("lease_expired", "cancelled"):
    JOBS_ENDED_BY_SWEEPER.labels(_why)
for _outcome in ("ended", "requested"):
    CANCELS.labels(_outcome)
for _kind in ("deployments", "jobs"):  # every series exists from the start, at 0
    for _outcome in ("inserted", "replaced", "skipped", "failed"):
        IMPORT_ROWS.labels(_kind, _outcome)


EVENT_STREAMS = Gauge("jobservice_event_streams", "GET /events streams open in this instance.")
EVENT_STREAMS_DROPPED = Counter(
    "jobservice_event_streams_dropped",
    "Event streams ended because their client read too slowly.",
)


class CommandMetrics(monitoring.CommandListener):
    """Times every database command. Called inline by the driver: keep it this cheap."""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        DB_DURATION.labels(event.command_name, "ok").observe(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        DB_DURATION.labels(event.command_name, "error").observe(event.duration_micros / 1e6)


COMMAND_METRICS = CommandMetrics()


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count and time one request; the request middleware (service.logs) measures it once
    for both its access line and these series."""
    count, duration = _http_series(method if method in METHODS else "OTHER", route, status)
    count.inc()
    duration.observe(seconds)


_SERIES: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def _http_series(method: str, route: str, status: int) -> tuple[Counter, Histogram]:
    """The two children for one label set, looked up once (labels() costs microseconds)."""
    key = (method, route, status)
    series = _SERIES.get(key)
    if series is None:
        labels = (method, route, str(status))
        series = _SERIES[key] = (HTTP_REQUESTS.labels(*labels), HTTP_DURATION.labels(*labels))
    return series


def exposition() -> bytes:
    """Every metric of the process, in the text format `CONTENT_TYPE` names."""
    return generate_latest(REGISTRY)
