"""Bad rows never stop a run: they are dropped, counted by reason and listed in an errors file.

Data tasks run all over the cluster, so the counts live in one small Ray actor. It also enforces the
error-rate ceiling, turning a mostly broken dataset into one clear failure instead of a silent
training run on what little is left.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import ray

from af3dist.storage import write_text


class DataQualityError(RuntimeError):
    """Too large a share of the rows is unusable."""


def _ceiling_message(seen: int, dropped: int, by_reason: dict[str, int], ceiling: float) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items()))
    return (f"{dropped} of {seen} rows ({dropped / seen:.0%}) were unusable, over the error-rate ceiling of "
            f"{ceiling:.0%} (data.error_rate_ceiling): {reasons}. Check the dataset.")


class ErrorCounts:
    """Counts and the list of dropped rows; plain Python so it is testable without Ray."""

    def __init__(self, ceiling: float = 1.0, min_rows: int = 1):
        self.ceiling = ceiling
        self.min_rows = min_rows
        self.seen = 0
        self.by_reason: Counter[str] = Counter()
        self.rows: list[dict] = []

    @property
    def dropped(self) -> int:
        return sum(self.by_reason.values())

    def record(self, seen: int, errors: list[dict]) -> str | None:
        """Add a batch's counts; returns the failure message once the ceiling is exceeded."""
        self.seen += seen
        for e in errors:
            self.by_reason[e["reason"]] += 1
            self.rows.append(e)
        return self.check(self.min_rows)

    def check(self, min_rows: int = 1) -> str | None:
        if self.seen >= min_rows and self.seen and self.dropped / self.seen > self.ceiling:
            return _ceiling_message(self.seen, self.dropped, dict(self.by_reason), self.ceiling)
        return None

    def summary(self) -> dict:
        return {"rows_seen": self.seen, "rows_dropped": self.dropped, "dropped_by_reason": dict(self.by_reason)}

    def write(self, path: str) -> str:
        """Write the dropped rows as JSONL, whole or not at all (temp file, then rename on local disk)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        write_text(path, text)
        return path


@ray.remote(num_cpus=0)
class ErrorLedger(ErrorCounts):
    """The cluster-wide ErrorCounts of one pipeline run."""

    def get_summary(self) -> dict:
        return self.summary()

    def get_rows(self) -> list[dict]:
        """The dropped rows recorded so far (id, split, reason, detail), in arrival order."""
        return list(self.rows)

    def final_check(self) -> str | None:
        return self.check(1)


class Reports:
    """A data task's reports to the ledger, sent without waiting for each to land, and batched: dropped rows go
    at once, together with every row seen so far, while the counts of rows that all went well wait up to
    `every_s` seconds (a remote call per decode batch cost the task and the ledger CPU for nothing). Sending
    the seen rows with the errors keeps the ledger's error rate from ever running ahead of this task's rows.
    A reply that says the ceiling is passed raises at the next report; `flush` (at the end of the task) sends
    what is left and waits for every reply, so the counts are complete, and the ceiling checked, when the
    task's last rows are handed on."""

    def __init__(self, ledger, every_s: float = 1.0):
        self.ledger = ledger
        self.every_s = every_s
        self.pending: list = []
        self.unsent_seen = 0
        self.last_sent = time.monotonic()

    def report(self, seen: int, errors: list[dict]) -> None:
        """Record a batch's seen count and dropped rows; DataQualityError once a landed reply says the ceiling
        is passed."""
        if self.ledger is None:
            return
        self.unsent_seen += seen
        if errors or (self.unsent_seen and time.monotonic() - self.last_sent >= self.every_s):
            self._send(errors)
        if self.pending:
            done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            self._raise_if_over(done)

    def flush(self) -> None:
        if self.ledger is not None and self.unsent_seen:
            self._send([])
        pending, self.pending = self.pending, []
        self._raise_if_over(pending)

    def _send(self, errors: list[dict]) -> None:
        self.pending.append(self.ledger.record.remote(self.unsent_seen, errors))
        self.unsent_seen, self.last_sent = 0, time.monotonic()

    @staticmethod
    def _raise_if_over(refs: list) -> None:
        for message in ray.get(refs) if refs else []:
            if message:
                raise DataQualityError(message)
