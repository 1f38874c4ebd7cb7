"""python -m tests.chaos [--minutes N] [--times K] [--seed S] [--rate R] [--only KINDS]: each
fault kind K times (default: one per minute, at least 5) at random moments under load, on a
private PostgreSQL cluster, then the audit and its table. Exits 1 when anything was lost, duplicated, applied out
of order or left the ledger unlike the model."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from tests.chaos.campaign import Plan, run
from tests.chaos.pipeline import FAULTS
from tests.cluster import Cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the load runs (default 5)")
    parser.add_argument("--times", type=int, default=0, help="injections per fault kind (default max(5, minutes))")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--rate", type=float, default=80.0, help="events submitted per second (default 80)")
    parser.add_argument("--entities", type=int, default=48)
    parser.add_argument("--only", default="", help=f"comma-separated fault kinds of {', '.join(FAULTS)}")
    args = parser.parse_args(argv)
    only = [kind for kind in args.only.split(",") if kind] or list(FAULTS)
    unknown = sorted(set(only) - set(FAULTS))
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULTS)}")
    times = args.times or max(5, round(args.minutes))
    plan = Plan.every_fault(
        args.minutes * 60, times, args.seed, kinds=only, rate=args.rate, entities=args.entities, workers=16
    )
    plan.audit_timeout = 300.0
    print(f"chaos: {args.minutes:g} min, {len(plan.faults)} faults, seed {args.seed}", flush=True)
    cluster = Cluster()
    try:
        cluster.start()
        url = cluster.fresh_database()
        report = asyncio.run(run(plan, cluster, url, say=lambda line: print(line, flush=True)))
    finally:
        cluster.remove()
    print()
    print(report.table())
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
