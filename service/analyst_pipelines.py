"""Ready-to-paste `mongosh` pipelines for analysts, the single source of the README's copies.

Each text is valid JavaScript for `mongosh` and its argument is plain JSON, so the test
suite runs exactly these texts (tests/test_analytics_pipelines.py) against the data the
endpoint tests use, and checks that the README shows exactly them.
`python -m service.analyst_pipelines` prints the README's markdown for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PREFIX, SUFFIX = "db.jobs.aggregate(", ")"


@dataclass(frozen=True)
class AnalystPipeline:
    name: str
    title: str
    about: str
    text: str  # what an analyst pastes into mongosh

    def pipeline(self) -> list[dict[str, Any]]:
        """The stages, parsed from the very text the README shows."""
        if not (self.text.startswith(PREFIX) and self.text.endswith(SUFFIX)):
            raise ValueError(f"{self.name}: not a db.jobs.aggregate([...]) call")
        stages: list[dict[str, Any]] = json.loads(self.text[len(PREFIX) : -len(SUFFIX)])
        return stages

    def markdown(self) -> str:
        return f"#### {self.title}\n\n{self.about}\n\n```js\n{self.text}\n```\n"


FAILURE_RATE = AnalystPipeline(
    "failure_rate",
    "Failure rate per deployment per day",
    "Of the jobs that ended (FINISHED or ERROR), the share that failed, per deployment and "
    "UTC day of `started_at`; the same numbers as `error_rate` from "
    "`GET /stats/jobs?group_by=deployment_id&interval=day`.",
    """\
db.jobs.aggregate([
  {"$match": {"task_status": {"$in": ["FINISHED", "ERROR"]}}},
  {"$group": {
    "_id": {
      "deployment_id": "$deployment_id",
      "day": {"$dateTrunc": {"date": "$started_at", "unit": "day", "timezone": "UTC"}}
    },
    "finished": {"$sum": {"$cond": [{"$eq": ["$task_status", "FINISHED"]}, 1, 0]}},
    "failed": {"$sum": {"$cond": [{"$eq": ["$task_status", "ERROR"]}, 1, 0]}}
  }},
  {"$project": {
    "_id": 0,
    "deployment_id": "$_id.deployment_id",
    "day": "$_id.day",
    "finished": 1,
    "failed": 1,
    "failure_rate": {"$divide": ["$failed", {"$add": ["$finished", "$failed"]}]}
  }},
  {"$sort": {"deployment_id": 1, "day": 1}}
])""",
)

P95_RUN_TIME = AnalystPipeline(
    "p95_run_time",
    "p95 run time per user",
    "Run time is RUNNING → FINISHED/ERROR from `history`, in seconds; p95 is the nearest-rank "
    "percentile (the sample at rank ceil(95·n/100) in ascending order), the same as "
    "`run_time_s.p95` from `GET /stats/jobs?group_by=user_id`.",
    """\
db.jobs.aggregate([
  {"$match": {"task_status": {"$in": ["FINISHED", "ERROR"]}}},
  {"$project": {
    "user_id": 1,
    "run_s": {"$let": {
      "vars": {
        "r": {"$first": {"$filter": {
          "input": "$history", "cond": {"$eq": ["$$this.task_status", "RUNNING"]}
        }}},
        "e": {"$last": "$history"}
      },
      "in": {"$divide": [
        {"$dateDiff": {"startDate": "$$r.at", "endDate": "$$e.at", "unit": "millisecond"}},
        1000
      ]}
    }}
  }},
  {"$match": {"run_s": {"$ne": null}}},
  {"$group": {"_id": "$user_id", "runs": {"$push": "$run_s"}}},
  {"$project": {
    "_id": 0,
    "user_id": "$_id",
    "jobs": {"$size": "$runs"},
    "p95_run_s": {"$arrayElemAt": [
      {"$sortArray": {"input": "$runs", "sortBy": 1}},
      {"$subtract": [{"$ceil": {"$divide": [{"$multiply": [95, {"$size": "$runs"}]}, 100]}}, 1]}
    ]}
  }},
  {"$sort": {"user_id": 1}}
])""",
)

STUCK_RUNNING = AnalystPipeline(
    "stuck_running",
    "Jobs stuck in RUNNING for more than an hour",
    "RUNNING jobs that entered RUNNING (per `history`) more than an hour ago, oldest first.",
    """\
db.jobs.aggregate([
  {"$match": {"task_status": "RUNNING"}},
  {"$project": {
    "deployment_id": 1,
    "user_id": 1,
    "running_since": {"$let": {
      "vars": {"r": {"$first": {"$filter": {
        "input": "$history", "cond": {"$eq": ["$$this.task_status", "RUNNING"]}
      }}}},
      "in": "$$r.at"
    }}
  }},
  {"$set": {"running_for_s": {"$divide": [
    {"$dateDiff": {"startDate": "$running_since", "endDate": "$$NOW", "unit": "millisecond"}},
    1000
  ]}}},
  {"$match": {"running_for_s": {"$gt": 3600}}},
  {"$project": {
    "_id": 0,
    "job_id": "$_id",
    "deployment_id": 1,
    "user_id": 1,
    "running_since": 1,
    "running_for_s": 1
  }},
  {"$sort": {"running_since": 1, "job_id": 1}}
])""",
)

BUSIEST_HOURS = AnalystPipeline(
    "busiest_hours",
    "Busiest hours",
    "Jobs started per hour of the day (0-23, UTC), busiest first; the sums over the days of "
    "the `count`s from `GET /stats/jobs?interval=hour`.",
    """\
db.jobs.aggregate([
  {"$group": {
    "_id": {"$hour": {"date": "$started_at", "timezone": "UTC"}},
    "jobs": {"$sum": 1}
  }},
  {"$project": {"_id": 0, "hour": "$_id", "jobs": 1}},
  {"$sort": {"jobs": -1, "hour": 1}}
])""",
)

RESULTS_VOLUME = AnalystPipeline(
    "results_volume",
    "Results volume per deployment",
    "Result files and their total size in bytes (from each entry's `size` in `results`), per "
    "deployment with any, largest first; the same as `result_files` and `result_bytes` from "
    "`GET /stats/deployments`.",
    """\
db.jobs.aggregate([
  {"$unwind": "$results"},
  {"$group": {
    "_id": "$deployment_id",
    "files": {"$sum": 1},
    "bytes": {"$sum": "$results.size"}
  }},
  {"$project": {"_id": 0, "deployment_id": "$_id", "files": 1, "bytes": 1}},
  {"$sort": {"bytes": -1, "deployment_id": 1}}
])""",
)

EXPIRED_LEASES = AnalystPipeline(
    "expired_leases",
    "Expired leases per executor",
    "Claimed jobs that the service ended because their executor stopped heartbeating "
    '(ERROR with `status_reason` `"lease expired"`), per executor (the `executor` of the '
    "job's last RUNNING `history` entry, the one whose claim made it RUNNING), with the "
    "latest such end; most first.",
    """\
db.jobs.aggregate([
  {"$match": {"task_status": "ERROR", "status_reason": "lease expired"}},
  {"$project": {
    "finished_at": 1,
    "executor": {"$let": {
      "vars": {"r": {"$last": {"$filter": {
        "input": "$history", "cond": {"$eq": ["$$this.task_status", "RUNNING"]}
      }}}},
      "in": "$$r.executor"
    }}
  }},
  {"$group": {
    "_id": "$executor",
    "expired": {"$sum": 1},
    "last_expired_at": {"$max": "$finished_at"}
  }},
  {"$project": {"_id": 0, "executor": "$_id", "expired": 1, "last_expired_at": 1}},
  {"$sort": {"expired": -1, "executor": 1}}
])""",
)

PIPELINES = [
    FAILURE_RATE,
    P95_RUN_TIME,
    STUCK_RUNNING,
    BUSIEST_HOURS,
    RESULTS_VOLUME,
    EXPIRED_LEASES,
]


if __name__ == "__main__":
    print("\n".join(p.markdown() for p in PIPELINES), end="")
