"""The job's rules: its statuses, which changes between them are allowed, and its history.

Plain functions and tables with no I/O, used by the API (jobs.py), imports and statistics
alike, so a rule is stated once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    ERROR = "ERROR"


STATUS_NAMES = [s.value for s in TaskStatus]
TERMINAL = frozenset({TaskStatus.FINISHED, TaskStatus.ERROR})
TERMINAL_NAMES = sorted(str(s) for s in TERMINAL)

# Allowed transitions, and for each target the statuses it may come from.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.ERROR}),
    TaskStatus.RUNNING: frozenset({TaskStatus.FINISHED, TaskStatus.ERROR}),
    TaskStatus.FINISHED: frozenset(),
    TaskStatus.ERROR: frozenset(),
}
PREDECESSORS: dict[TaskStatus, list[str]] = {
    target: [str(s) for s, targets in TRANSITIONS.items() if target in targets]
    for target in TaskStatus
}
# The shortest way from PENDING (where every job starts) to each status.
SHORTEST_PATH: dict[TaskStatus, list[TaskStatus]] = {
    TaskStatus.PENDING: [],
    TaskStatus.RUNNING: [TaskStatus.RUNNING],
    TaskStatus.FINISHED: [TaskStatus.RUNNING, TaskStatus.FINISHED],
    TaskStatus.ERROR: [TaskStatus.ERROR],
}

Entry = tuple[TaskStatus, datetime]  # one history entry: the status and when it was entered


def transition_problem(current: str | None, target: TaskStatus) -> str | None:
    """Why a job in `current` cannot change to `target`, or None when it can."""
    if current in PREDECESSORS[target]:
        return None
    return f"Cannot change task_status from {current} to {target.value}."


def default_history(
    status: TaskStatus, started: datetime, finished: datetime | None
) -> list[Entry]:
    """The shortest allowed history to `status`: every step entered at `started`, except
    that FINISHED and ERROR are entered at `finished` when it is known."""
    entries: list[Entry] = [(TaskStatus.PENDING, started)]
    for step in SHORTEST_PATH[status]:
        at = finished if step in TERMINAL and finished is not None else started
        entries.append((step, at))
    return entries


def history_problem(history: Sequence[Entry], status: TaskStatus, started: datetime) -> str | None:
    """Why `history` cannot be the history of a job now in `status`, or None."""
    if not history or history[0][0] != TaskStatus.PENDING:
        return "history: must start with PENDING"
    for n, ((before, _), (after, _)) in enumerate(itertools.pairwise(history), 1):
        if after not in TRANSITIONS[before]:
            return f"history.{n}: {before.value} cannot change to {after.value}"
    if history[-1][0] != status:
        return f"history: must end with task_status ({status.value})"
    for n, (_, at) in enumerate(history):
        if at < started:
            return f"history.{n}.at: is before started_at"
    return None


# --- executors: leases and cancels ----------------------------------------------------

LEASE_EXPIRED = "lease expired"
LEASE_S_DEFAULT, LEASE_S_MIN, LEASE_S_MAX = 60, 5, 3600
MAX_REASON = 1000  # characters of a status_reason or a cancel reason a client gives
CANCELLED = "cancelled"
# The longest status_reason the service itself writes: a cancel's, "cancelled: <reason>".
MAX_STATUS_REASON = len(f"{CANCELLED}: ") + MAX_REASON


def cancelled(reason: str | None) -> str:
    """The status_reason of a job ended by a cancel."""
    return f"{CANCELLED}: {reason}" if reason else CANCELLED


def lease_problem(
    status: str | None, lease: dict[str, Any] | None, executor: str, now: datetime
) -> str | None:
    """Why `executor` may not extend the lease of a job in `status` holding `lease`, or None."""
    if status != TaskStatus.RUNNING:
        return f"the job is {status}, not RUNNING: its lease has ended"
    if lease is None:
        return "the job was made RUNNING without a claim: it has no lease"
    if lease["executor"] != executor:
        return f"the job is leased to another executor ({lease['executor']!r})"
    if lease["expires_at"] <= now:
        return f"the lease expired at {lease['expires_at']:%Y-%m-%dT%H:%M:%S}Z"
    return None


def ending_reason(
    target: TaskStatus, given: str | None, cancel_requested: bool, cancel_reason: str | None
) -> str | None:
    """The status_reason a status change leaves: the one given; for a job asked to cancel
    that ends in ERROR, the cancel; else none."""
    if given is not None:
        return given
    if target == TaskStatus.ERROR and cancel_requested:
        return cancelled(cancel_reason)
    return None
