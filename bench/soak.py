"""The soak's numbers: resident memory sampled through a steady load, the timeline per bucket,
growth after warm-up, and the printed section. No I/O but /proc readings (the database's
backends come from a callable the runner passes in).

A leak shows as resident memory that keeps growing once pools, caches and the allocator's
arenas have filled up; a process that only warms up levels off. So growth is measured from just
after a warm-up to the end: (median of the last window - median of the first samples after the
warm-up) / the latter, per service process.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import report
from bench.processes import rss_anon_mb, rss_mb

#: The services whose growth has a target, and PostgreSQL's backends of the run database
#: (their private memory, RssAnon, summed: reported, no target, since backends come and go).
SERVICES = ("sequencer", "ledger")
POSTGRES = "postgres"
#: Target: resident memory grows less than this share after the warm-up.
RSS_GROWTH_MAX = 0.10
#: The warm-up figure is the median of this many samples from the warm-up mark on (one sample
#: alone could catch a burst of garbage about to be freed).
BASELINE_SAMPLES = 3
#: A timeline row below this share of the offered rate fell behind: that minute ran in overload.
BEHIND = 0.9
#: The mix of a soak (loadgen's `soak` Mix), for the printed header.
MIX_TEXT = "in order, 10 % of steps successor-first (parked, then released), 5 % re-sent at once"


def default_warmup(duration: float) -> float:
    """60 s, or a fifth of a shorter soak, so a short run still has samples after it."""
    return round(min(60.0, duration / 5), 1)


def window(duration: float) -> float:
    """The last window's length: the last minute, or a fifth of a shorter soak."""
    return round(min(60.0, duration / 5), 1)


def bucket_seconds(duration: float, interval: float) -> float:
    """One timeline row per minute; a short soak gets six rows (at least one sample each)."""
    return 60.0 if duration >= 180 else max(interval, round(duration / 6, 1))


# How often the soak vacuums the services' tables itself when the cluster runs no autovacuum.
VACUUM_INTERVAL = 30.0


@dataclass
class Vacuum:
    """Autovacuum's stand-in on a cluster that runs none (CI's has `autovacuum = off`): the
    services' tables churn (every event's row changes state, the entities' rows change with every
    batch, gap rows come and go), and without vacuum their dead rows slow every statement over a
    long run, which would measure the cluster's configuration, not the services."""

    connect: Callable[[], Any]
    interval: float = VACUUM_INTERVAL
    runs: int = 0
    seconds: float = 0.0
    due: float = field(default_factory=time.monotonic)

    def maybe(self) -> None:
        if time.monotonic() < self.due:
            return
        started = time.monotonic()
        with self.connect() as conn:
            tables = conn.execute(
                "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables "
                "WHERE schemaname IN ('sequencer', 'ledger')"
            ).fetchall()
            conn.execute("VACUUM (ANALYZE) " + ", ".join(t[0] for t in tables))
        self.runs += 1
        self.seconds += time.monotonic() - started
        self.due = time.monotonic() + self.interval


@dataclass
class Sampler:
    """RSS of each service process, and the run database's backends, at one moment."""

    pids: dict[str, int]
    backends: Callable[[], list[int]]
    origin: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    vacuum: Vacuum | None = None

    def rebase(self, origin: float) -> None:
        """Makes `t` count from `origin` (the load's first send): the warm-up and the timeline
        then start with the load, not with the load generator's imports."""
        shift = origin - self.origin
        for row in self.samples:
            row["t"] = round(row["t"] - shift, 2)
        self.origin = origin

    def sample(self) -> None:
        row: dict[str, Any] = {"t": round(time.time() - self.origin, 2)}
        for name, pid in self.pids.items():
            row[name] = _round(rss_mb(pid))
        # A database on another host has no /proc here: None, not 0.
        anon = [value for value in (rss_anon_mb(pid) for pid in self.backends()) if value is not None]
        row[POSTGRES] = round(sum(anon), 1) if anon else None
        row["postgres_backends"] = len(anon)
        self.samples.append(row)
        if self.vacuum is not None:
            self.vacuum.maybe()


def growth(
    samples: list[dict[str, Any]], key: str, warmup: float, last: float, maximum: float | None
) -> dict[str, Any]:
    """Growth of one series after the warm-up; a target result where `maximum` is given."""
    series = [(float(s["t"]), float(s[key])) for s in samples if s.get(key) is not None]
    after = [value for t, value in series if t >= warmup]
    end = series[-1][0] if series else 0.0
    final = [value for t, value in series if t >= max(warmup, end - last)]
    base = statistics.median(after[:BASELINE_SAMPLES]) if after else None
    tail = statistics.median(final) if final else None
    value = None if not base or tail is None else round((tail - base) / base, 4)
    out: dict[str, Any] = {
        "warmup_mb": None if base is None else round(base, 1),
        "final_mb": None if tail is None else round(tail, 1),
        "peak_mb": max((v for _t, v in series), default=None),
    }
    if maximum is None:
        return {**out, "metric": "rss_growth", "value": value}
    return {**out, **report.target("rss_growth", value, maximum=maximum)}


def event_times(
    result: dict[str, Any], first: dict[tuple[int, int], list[Any]], rows: dict[tuple[str, int], Any], origin: float
) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """From the load generator's records and the sequencer's rows, in seconds since `origin`:
    when each answer arrived, when each event was applied, and (send time, submit-to-applied)
    per applied event. The same definitions as the workload row's submitted/s, applied/s, s2a."""
    entities = result["entities"]
    acked = [r[3] + r[4] - origin for r in result["requests"] if not r[7] and r[8] != "replay"]
    applied: list[float] = []
    s2a: list[tuple[float, float]] = []
    for (index, sequence), record in first.items():
        stored = rows.get((entities[index][1], sequence))
        if stored is not None and stored[2] is not None:
            applied.append(stored[2] - origin)
            s2a.append((record[3] - origin, max(0.0, stored[2] - record[3])))
    return acked, applied, s2a


def timeline(
    samples: list[dict[str, Any]],
    acked: list[float],
    applied: list[float],
    s2a: list[tuple[float, float]],
    end: float,
    bucket: float,
    rate: float,
) -> list[dict[str, Any]]:
    """Rows of `bucket` seconds over the load: median RSS per process, acknowledged and applied
    events per second, and the submit-to-applied p99 of the events sent in the bucket. All
    times are seconds since the load generator began sending."""
    rows = []
    # Callers finish their call in flight after the deadline: a remainder shorter than half a
    # bucket joins the last row instead of making a row of its own with noisy rates.
    count = max(1, math.floor(end / bucket) + (1 if end % bucket >= bucket / 2 else 0))
    for n in range(count):
        start, stop = n * bucket, end if n == count - 1 else (n + 1) * bucket
        seconds = stop - start
        if seconds <= 0:
            break
        # The last row also takes the samples taken while the load generator wrote its output.
        inside = [s for s in samples if start <= s["t"] < stop or (n == count - 1 and s["t"] >= stop)]
        row: dict[str, Any] = {"from": round(start, 1), "to": round(stop, 1)}
        for key in (*SERVICES, POSTGRES):
            values = [s[key] for s in inside if s.get(key) is not None]
            row[f"{key}_mb"] = round(statistics.median(values), 1) if values else None
        row["submitted_per_s"] = report.rate(sum(1 for t in acked if start <= t < stop), seconds)
        row["of_offered"] = report.ratio(row["submitted_per_s"], rate)
        row["applied_per_s"] = report.rate(sum(1 for t in applied if start <= t < stop), seconds)
        row["s2a_p99_ms"] = report.ms(report.percentile([d for t, d in s2a if start <= t < stop], 99))
        rows.append(row)
    return rows


TIMELINE_COLUMNS = (
    ("seq RSS", "sequencer_mb", " MiB"),
    ("ledger RSS", "ledger_mb", " MiB"),
    ("pg anon RSS", "postgres_mb", " MiB"),
    ("submitted/s", "submitted_per_s", ""),
    ("of offered", "of_offered_percent", " %"),
    ("applied/s", "applied_per_s", ""),
    ("s2a p99", "s2a_p99_ms", " ms"),
)


def render(soak: dict[str, Any]) -> str:
    minutes = soak["bucket_seconds"] == 60.0
    head = "minute" if minutes else "seconds"
    cells = [[head, *(name for name, _key, _suffix in TIMELINE_COLUMNS)]]
    for row in soak["timeline"]:
        if minutes:
            # The last row may run a few hundred ms past its minute (calls in flight at the end).
            first = int(row["from"] // 60)
            label = f"{first}-{max(first + 1, round(row['to'] / 60))}"
        else:
            label = f"{row['from']:g}-{row['to']:g}"
        shown = {**row, "of_offered_percent": None if row["of_offered"] is None else row["of_offered"] * 100}
        cells.append([label, *(report.fmt(shown.get(key), suffix) for _name, key, suffix in TIMELINE_COLUMNS)])
    behind = [row for row in soak["timeline"] if row["of_offered"] is not None and row["of_offered"] < BEHIND]
    lines = [
        f"soak: {soak['seconds']:g} s at {soak['rate']:g} events/s offered ({soak['rate_source']}); "
        f"{soak['concurrency']} callers, {soak['entities']} entities; {MIX_TEXT}",
    ]
    vacuum = soak.get("vacuum")
    if vacuum:
        lines.append(
            f"  autovacuum is off on this cluster: the soak ran VACUUM (ANALYZE) of the services' tables every "
            f"{vacuum['interval']:g} s in its stead ({vacuum['runs']} runs, {vacuum['seconds']:.1f} s in all)"
        )
    lines.append(report.grid(cells))
    if behind:
        lines.append(
            f"  the pipeline fell behind the offered rate (< {BEHIND:.0%}) in {len(behind)} of "
            f"{len(soak['timeline'])} rows: those ran in overload (a backlog grows), try a lower --rate"
        )
    lines += [
        f"RSS growth after the warm-up ({soak['warmup_seconds']:g} s): median of the last {soak['window_seconds']:g} s "
        f"against the median of the first {BASELINE_SAMPLES} samples after the warm-up "
        f"({len(soak['samples'])} samples, every {soak['sample_interval']:g} s)",
    ]
    for name, figures in soak["rss_growth"].items():
        value = figures["value"]
        text = "-" if value is None else f"{value * 100:+.1f} %"
        label = "postgres backends (RssAnon)" if name == POSTGRES else name
        verdict = "no target" if name == POSTGRES else f"target < {RSS_GROWTH_MAX:.0%}: {figures.get('result') or '-'}"
        lines.append(
            f"  {label:<28} {report.fmt(figures['warmup_mb'], ' MiB')} -> {report.fmt(figures['final_mb'], ' MiB')}"
            f"  {text}  ({verdict})"
        )
    return "\n".join(lines)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
