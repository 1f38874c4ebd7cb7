"""One fault campaign: the pipeline under load, faults injected at random moments, then the audit.

The short tests in `make test` run it for a few seconds with one fault; `make chaos` runs it for
minutes with every fault kind many times."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.audit import Findings, audit
from tests.chaos.load import Load, Producer
from tests.chaos.pipeline import FAULTS, Pipeline
from tests.cluster import Cluster


@dataclass
class Plan:
    """How long the load runs and which faults it meets, in this order (at random moments)."""

    duration: float
    faults: list[str]
    seed: int = 1
    entities: int = 24
    workers: int = 12
    rate: float = 80.0
    max_backlog: int = 1000
    drain: float = 120.0
    audit_timeout: float = 180.0

    @classmethod
    def every_fault(cls, duration: float, times: int, seed: int, kinds: list[str] | None = None, **kwargs: Any) -> Plan:
        faults = [kind for kind in kinds or FAULTS for _ in range(times)]
        random.Random(seed).shuffle(faults)
        return cls(duration=duration, faults=faults, seed=seed, **kwargs)


@dataclass
class Report:
    injected: Counter[str]
    findings: Findings
    counts: Counter[str]
    problems: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.findings.failures == 0 and not self.findings.problems and not self.problems

    def table(self) -> str:
        f = self.findings
        rows = [("fault kind", "injected")]
        rows += [(kind, str(self.injected[kind])) for kind in FAULTS]
        rows += [("", ""), ("total", "")]
        rows += [
            ("events submitted", str(f.submitted)),
            ("events applied", str(f.applied)),
            ("lost", str(f.lost)),
            ("duplicated", str(f.duplicated)),
            ("out of order", str(f.out_of_order)),
            ("ledger mismatches", str(f.ledger_mismatches)),
            ("sequencer mismatches", str(f.sequencer_mismatches)),
            ("unexpected answers", str(self.counts["unexpected answers"])),
            ("", ""),
            ("load", ""),
        ]
        load_rows = ("SubmitEvent calls", "SubmitEvents calls", "SubmitEvents items", "retries", "replays sent")
        rows += [(name, str(self.counts[name])) for name in (*load_rows, "duplicates sent", "held back (backlog)")]
        rows += [("audit waited", f"{f.waited:.1f} s"), ("campaign", f"{self.seconds:.0f} s")]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value:>8}".rstrip() if name else "" for name, value in rows]
        lines.insert(1, "-" * (width + 10))
        problems = [*f.problems, *self.problems]
        if problems:
            lines += ["", "problems:", *(f"  {p}" for p in problems)]
        return "\n".join(lines)


async def run(
    plan: Plan, cluster: Cluster, database_url: str, say: Callable[[str], None] = lambda _line: None
) -> Report:
    rng = random.Random(plan.seed)
    started = time.monotonic()
    pipeline = Pipeline(cluster, database_url)
    injected: Counter[str] = Counter()
    await pipeline.start()
    say(f"{time.monotonic() - started:7.1f} s  started: ledger, {len(pipeline.sequencers)} sequencers")
    producer = Producer(pipeline.addresses, random.Random(plan.seed + 1))
    load = Load(
        producer,
        random.Random(plan.seed + 2),
        entities=plan.entities,
        workers=plan.workers,
        rate=plan.rate,
        backlog=pipeline.backlog,
        max_backlog=plan.max_backlog,
    )
    problems: list[str] = []
    try:
        load.start()
        end = time.monotonic() + plan.duration
        for index, kind in enumerate(plan.faults):
            # Spread the rest of the faults over the rest of the time, at random moments.
            share = max(0.0, end - time.monotonic()) / (len(plan.faults) - index + 0.5)
            await asyncio.sleep(rng.uniform(0.4, 1.4) * share)
            at = time.monotonic() - started
            note = await FAULTS[kind](pipeline, rng)
            injected[kind] += 1
            say(f"{at:7.1f} s  {kind:<16} {note}")
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        say(f"{time.monotonic() - started:7.1f} s  load stops; draining")
        await load.stop(plan.drain)
        say(f"{time.monotonic() - started:7.1f} s  auditing")
        findings = await asyncio.to_thread(audit, database_url, load.streams, plan.audit_timeout)
        if findings.failures or findings.problems:
            problems.append("last log lines:\n" + pipeline.tail())
    finally:
        await producer.close()
        await pipeline.close_monitor()
        await asyncio.to_thread(pipeline.stop)
    problems[:0] = producer.problems
    return Report(injected, findings, producer.counts, problems, time.monotonic() - started)
