"""A stage that writes a store shard by shard, resumably, alone or under torchrun: the whole
journal protocol in one place.

Alone, the stage creates (or resumes) the store and writes each pending shard into the manifest. Under
torchrun, rank 0 creates or resumes the store while the other ranks wait, then they join it
(:meth:`Store.join`); shard k belongs to rank k mod world; every rank writes its shards with a journal
(:meth:`Store.write_shard`), and once all are done rank 0 records every journal in the manifest
(:meth:`Store.absorb_journals`). A rank killed at any point leaves whole shards with journals, or
nothing that counts, so a rerun completes the store, byte-identical to a run in one process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import distributed
from ..store import Store, StoreError, StoreSummary


@dataclass
class StageReport:
    """What a stage run did: items computed now, items found done (resumed), failures, time."""

    stage: str
    out: Path
    computed: int
    resumed: int
    failed_now: int
    seconds: float
    summary: StoreSummary
    failures: list[tuple[str, str]] = field(default_factory=list)
    unit: str = "item"
    notes: list[str] = field(default_factory=list)

    def lines(self, max_failures: int = 10) -> list[str]:
        rate = self.computed / self.seconds if self.seconds > 0 else float("nan")
        out = [f"{self.stage}: {self.computed} {self.unit}s computed in {self.seconds:.1f} s "
               f"({rate:.2f} {self.unit}s/s), {self.resumed} already done (resumed), "
               f"{self.failed_now} failed now",
               f"store {self.out}: {self.summary.line()}"]
        if self.failures:
            out.append(f"{len(self.failures)} {self.unit}s skipped (unreadable):")
            out += [f"  {item_id}: {err}" for item_id, err in self.failures[:max_failures]]
            if len(self.failures) > max_failures:
                out.append(f"  ... and {len(self.failures) - max_failures} more (see the items table of the manifest)")
        return out + self.notes

    def figures(self) -> dict:
        """The counts and time as JSON values."""
        s = self.summary
        return {"computed": self.computed, "resumed": self.resumed, "failed_now": self.failed_now,
                "seconds": self.seconds, "done": s.done, "failed": s.failed, "items": s.items}


class ShardedStage:
    """The store of a stage (``Store.create`` keyword arguments), opened on every rank: ``pending`` is
    this rank's share of the shards still to write; :meth:`report` finishes the store and counts all ranks.
    ``redo``: called with the store once it is created or resumed (by the one process that does), returns
    done shards to compute again."""

    def __init__(self, stage: str, out: str | os.PathLike, *, t0: float, unit: str,
                 redo: Callable[[Store], list[int]] | None = None, **create) -> None:
        self.stage, self.out, self.t0, self.unit = stage, Path(out), t0, unit

        def create_and_redo(journal: bool) -> Store:
            store = Store.create(out, journal=journal, **create)
            if redo is not None:
                try:
                    store.redo(redo(store))
                except BaseException:
                    store.close()
                    raise
            return store

        self.store = _open(create_and_redo, out)
        summary = self.store.summary()
        self.resumed = summary.done + summary.failed
        self.pending = distributed.my_shards(self.store.pending_shards())

    def __enter__(self) -> ShardedStage:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()

    def report(self, computed: int, failed_now: int = 0, notes: list[str] | None = None) -> StageReport:
        """Once this rank wrote its shards: rank 0 records every rank's journals; the counts of all ranks."""
        distributed.barrier()
        if self.store.journal and distributed.is_main():
            self.store.absorb_journals()
        distributed.barrier()
        return StageReport(self.stage, self.out, computed=distributed.total(computed), resumed=self.resumed,
                           failed_now=distributed.total(failed_now), seconds=time.perf_counter() - self.t0,
                           summary=self.store.summary(), failures=self.store.failures(), unit=self.unit,
                           notes=notes or [])


def _open(create: Callable[[bool], Store], path: str | os.PathLike) -> Store:
    """Open a store for writing on every rank: rank 0 creates or resumes it (``create(journal)``)
    while the others wait, then they join it (:meth:`Store.join`). Alone: ``create(False)``.

    An error on rank 0 (a store made with other settings) is raised on every rank.
    """
    rank, world = distributed.rank_world()
    if world == 1:
        return create(False)
    store, error = None, [None]
    if rank == 0:
        try:
            store = create(True)
        except Exception as err:  # told to every rank below, then raised here too
            error = [f"{type(err).__name__}: {err}"]
            distributed.broadcast_object(error)
            raise
    distributed.broadcast_object(error)
    if error[0] is not None:
        raise StoreError(f"{path}: rank 0 could not open the store ({error[0]})")
    return store if store is not None else Store.join(path)
