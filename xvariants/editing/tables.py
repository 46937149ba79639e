"""CounterFact-style tables: many records edited and evaluated, the way the papers do it.

* one record at a time (``batch=1``, ROME's single-edit table): edit, evaluate the record,
  restore the weights bit for bit, next record;
* in groups (``batch=n``, MEMIT's scaling table): edit ``n`` records (one MEMIT batch, or
  ROME/FT applied one after another: :func:`sequential`), evaluate every record of the group
  with all its edits in place, restore, next group.

An *editor* is a function from a list of requests to the :class:`EditResult` objects it left
applied; :func:`run_table` undoes them after the evaluation, and checks at the end that the
model is bit for bit the one it was given. A record that cannot be encoded, or an edit that
raises :class:`EditError` (a subject that halts before the edited step), is skipped and
reported, not fatal: one odd record should not end a 300-record run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from xvariants.editing.deltas import EditResult
from xvariants.editing.metrics import RecordMetrics, aggregate, record_metrics
from xvariants.editing.requests import EditError, EditRequest, encode
from xvariants.editing.stats import model_fingerprint

#: a list of requests -> the results it left applied (empty for the unedited baseline)
Editor = Callable[[Sequence[EditRequest]], list[EditResult]]


def sequential(edit_one: Callable[[EditRequest], EditResult]) -> Editor:
    """An editor applying ``edit_one`` to each request in turn, each edit on top of the earlier
    ones (sequential ROME); a failure part-way undoes the edits already made, then propagates."""

    def run(requests: Sequence[EditRequest]) -> list[EditResult]:
        done: list[EditResult] = []
        try:
            for r in requests:
                done.append(edit_one(r))
        except BaseException:
            for result in reversed(done):
                result.restore()
            raise
        return done

    return run


def at_once(edit_many: Callable[[list[EditRequest]], EditResult]) -> Editor:
    """An editor making one edit of all the requests (a MEMIT batch, batched FT)."""
    return lambda requests: [edit_many(list(requests))]


@dataclass
class Table:
    """What :func:`run_table` measured.

    :param records: per evaluated record, its metrics (with every edit of its group in place).
    :param groups: the case ids edited together, per group (one id each for single edits).
    :param edit_seconds: wall seconds of each group's editor call.
    :param edit_cpu_seconds: this process's CPU seconds of the same calls (steadier than wall time
        on a machine shared with other jobs).
    :param skipped: ``{"case_ids", "reason"}`` of records or groups left out.
    """

    records: list[RecordMetrics] = field(default_factory=list)
    groups: list[list[Any]] = field(default_factory=list)
    edit_seconds: list[float] = field(default_factory=list)
    edit_cpu_seconds: list[float] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_edits(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def seconds_per_edit(self) -> float | None:
        """Editor wall time per edited record (None when nothing was edited)."""
        return sum(self.edit_seconds) / self.n_edits if self.n_edits and self.edit_seconds else None

    @property
    def cpu_seconds_per_edit(self) -> float | None:
        return sum(self.edit_cpu_seconds) / self.n_edits if self.n_edits and self.edit_cpu_seconds else None

    def aggregate(self) -> dict[str, dict[str, float]]:
        return aggregate(self.records)


def check_record(tokenizer: Any, record: Mapping[str, Any]) -> EditRequest:
    """The record's request, after checking that every prompt it is scored on encodes with both
    targets (a target the tokenizer does not know, a token joining prompt and target)."""
    request = EditRequest.from_record(record)
    rw = record["requested_rewrite"]
    prompts = [request.text(), *record.get("paraphrase_prompts", []), *record.get("neighborhood_prompts", [])]
    for target in (rw["target_new"]["str"], rw["target_true"]["str"]):
        for p in prompts:
            encode(tokenizer, p, target=target)
    return request


def run_table(model: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], editor: Editor | None, *,
              batch: int = 1, fluency: bool = False, reduce: str = "mean",
              progress: Callable[[int, int], None] | None = None) -> Table:
    """Edit ``records`` in groups of ``batch`` (the last group may be smaller) and evaluate each.

    :param editor: see :data:`Editor`; None evaluates the unedited model.
    :param fluency: also the n-gram entropy of sampled generations (:func:`record_metrics`).
    :param reduce: how a many-token target's NLL is formed (:func:`~.metrics.target_nll`).
    :param progress: called with ``(records done, records in all)`` after each group.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    table = Table()
    usable: list[tuple[Mapping[str, Any], EditRequest]] = []
    for record in records:
        try:
            usable.append((record, check_record(tokenizer, record)))
        except EditError as e:
            table.skipped.append({"case_ids": [record.get("case_id")], "reason": str(e)})
    before = model_fingerprint(model)
    for at in range(0, len(usable), batch):
        group = usable[at : at + batch]
        ids = [record.get("case_id") for record, _ in group]
        results: list[EditResult] = []
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                results = editor([r for _, r in group]) if editor is not None else []
            except EditError as e:
                table.skipped.append({"case_ids": ids, "reason": str(e)})
                continue
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            metrics = [record_metrics(model, tokenizer, record, fluency=fluency, reduce=reduce) for record, _ in group]
        finally:
            for result in reversed(results):
                result.restore()
        table.records += metrics
        if editor is not None:
            table.groups.append(ids)
            table.edit_seconds.append(seconds)
            table.edit_cpu_seconds.append(cpu)
        if progress is not None:
            progress(min(at + batch, len(usable)), len(usable))
    if model_fingerprint(model) != before:
        raise RuntimeError("run_table: after restoring every edit the weights differ from the ones it was given")
    return table
