"""Numbers from raw records, the printed table, and the JSON report."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def latency_summary(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values) if values else None),
    }


def rate(count: float, seconds: float | None) -> float | None:
    if not seconds or seconds <= 0:
        return None
    return round(count / seconds, 1)


def ratio(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return round(value / ceiling, 3)


def errors_by_code(requests: list[list[Any]]) -> dict[str, int]:
    return dict(Counter(r[7] for r in requests if r[7]))


def fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{suffix}" if abs(value) >= 10 else f"{value:.2f}{suffix}"
    return f"{value}{suffix}"


# Ingress first (calls, acknowledged events, ack latency per call), then what was applied.
COLUMNS = (
    ("workload", "workload", ""),
    ("events", "events", ""),
    ("calls/s", "calls_per_s", ""),
    ("submitted/s", "submitted_per_s", ""),
    ("ack p50", "ack_p50_ms", " ms"),
    ("ack p99", "ack_p99_ms", " ms"),
    ("applied/s", "applied_per_s", ""),
    ("s2a p50", "s2a_p50_ms", " ms"),
    ("s2a p99", "s2a_p99_ms", " ms"),
    ("replays/s", "replays_per_s", ""),
    ("errors", "errors", ""),
    ("seq RSS", "sequencer_peak_rss_mb", " MiB"),
    ("ledger RSS", "ledger_peak_rss_mb", " MiB"),
    ("audit", "audit", ""),
)


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[name for name, _key, _suffix in COLUMNS]]
    for row in rows:
        cells.append([fmt(row.get(key), suffix) for _name, key, suffix in COLUMNS])
    return grid(cells)


def grid(cells: list[list[str]], left: int = 1) -> str:
    """Aligned columns: the first `left` left-aligned (labels), the others right-aligned
    (figures), a rule under the head."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = []
    for n, line in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if i >= left else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: How each target metric is printed: label and unit.
TARGET_METRICS = {
    "submitted_vs_echo": ("submitted/echo", ""),
    "applied_vs_echo": ("applied/echo", ""),
    "s2a_p99_ms": ("s2a p99", " ms"),
    "rss_growth": ("RSS growth", " %"),
}


def target(
    metric: str, value: float | None, *, minimum: float | None = None, maximum: float | None = None
) -> dict[str, Any]:
    """A target and this run's figure: `value >= min`, or `value < max`. `met` and `result`
    are None when the run could not measure the figure."""
    if value is None:
        met = None
    elif minimum is not None:
        met = value >= minimum
    else:
        assert maximum is not None
        met = value < maximum
    bound = {"min": minimum} if minimum is not None else {"max": maximum}
    return {
        "metric": metric,
        **bound,
        "value": value,
        "met": met,
        "result": None if met is None else ("PASS" if met else "FAIL"),
    }


def targets_table(targets: list[dict[str, Any]]) -> str:
    """One row per target: where, what, the bound, this run's figure, PASS/FAIL."""
    cells = [["workload", "target", "bound", "measured", "result"]]
    for t in targets:
        label, unit = TARGET_METRICS.get(t["metric"], (t["metric"], ""))
        scale = 100.0 if unit == " %" else 1.0
        bound = f">= {fmt(t['min'] * scale, unit)}" if "min" in t else f"< {fmt(t['max'] * scale, unit)}"
        value = None if t["value"] is None else t["value"] * scale
        if t.get("process"):
            label = f"{t['process']} {label}"
        cells.append([t["workload"], label, bound, fmt(value, unit), t["result"] or "-"])
    return grid(cells, left=2)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def overload_line(figures: dict[str, Any]) -> str:
    """The overload workload in one line: offered, admitted, refused by reason, errors, late."""
    refused = ", ".join(f"{reason} {fmt(rate)}/s" for reason, rate in figures["refused_per_s"].items()) or "none"
    errors = ", ".join(f"{code} {n}" for code, n in figures["other_errors"].items()) or "none"
    return (
        f"    offered {fmt(figures['offered_per_s'])}/s (target {fmt(figures['target_rate'])}/s), "
        f"admitted {fmt(figures['admitted_per_s'])}/s, "
        f"refused {refused} (p99 {fmt(figures['refusal_p99_ms'], ' ms')}); "
        f"other errors: {errors}; expired in the client's queue {figures['expired_in_client_queue']}\n"
        f"    admitted ack p99 {fmt(figures['admitted_ack_p99_ms'], ' ms')} from arrival, "
        f"{fmt(figures['admitted_wire_p99_ms'], ' ms')} from send; "
        f"client queue wait p99 {fmt(figures['client_queue_wait_p99_ms'], ' ms')}; "
        f"re-sent later {figures['late_resent']}, admitted {figures['late_admitted']}"
    )
