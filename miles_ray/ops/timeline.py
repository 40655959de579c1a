"""The fault timeline of a run (``faults.png``): x is wall-clock seconds into the run (the running
sum of ``perf/time_step_s``; steps when it is missing).

Top: each recovery as a bar ending at the step it finished in, as long as it took
(``fault/recovery_s_each``), and the running counts of recoveries, Ray actor restarts and any other
``fault/`` counter. Bottom: engines in each health state at each step.
"""
from __future__ import annotations

from miles_ray.ops.rundir import keys_with

COUNTS = ("fault/recoveries", "fault/restarts")
NOT_COUNTERS = ("fault/engines_", "fault/recovery_s_")


def clock(rows: list[dict]) -> list[float]:
    """Seconds into the run at the end of each row (step index + 1 without step times)."""
    out, t = [], 0.0
    for r in rows:
        t += float(r.get("perf/time_step_s", 1.0) or 0.0)
        out.append(t)
    return out


def recovery_bars(rows: list[dict], t: list[float]) -> list[tuple[float, float]]:
    """(start, seconds) of each recovery: the i-th ended in the first row counting i recoveries."""
    each = next((r["fault/recovery_s_each"] for r in reversed(rows) if r.get("fault/recovery_s_each")), [])
    bars = []
    for i, seconds in enumerate(each, start=1):
        end = next((te for te, r in zip(t, rows) if (r.get("fault/recoveries") or 0) >= i), t[-1])
        bars.append((end - seconds, seconds))
    return bars


def _counters(rows: list[dict]) -> list[str]:
    extra = [k for k in keys_with(rows, "fault/") if k not in COUNTS and not k.startswith(NOT_COUNTERS)]
    return [k for k in COUNTS if any(k in r for r in rows)] + extra


def fault_timeline(fig, rows: list[dict]) -> bool:
    t = clock(rows)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.set_title("Faults and recoveries")
    bars = recovery_bars(rows, t)
    for i, (start, seconds) in enumerate(bars):  # one lane each, below zero: recoveries may overlap
        top.broken_barh([(start, seconds)], (-0.5 * (i + 1), 0.4), color="tab:red", alpha=0.5,
                        label="recovery (duration)" if i == 0 else None)
        top.annotate(f"{seconds:.1f}s", (start + seconds, -0.5 * (i + 1) + 0.2), fontsize=7, va="center")
    for key in _counters(rows):
        top.step(t, [r.get(key) or 0 for r in rows], where="post", label=key)
    top.set_ylabel("count")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    states = keys_with(rows, "fault/engines_")
    for key in states:
        bottom.step(t, [r.get(key) or 0 for r in rows], where="post", label=key.removeprefix("fault/engines_"))
    if states:
        bottom.legend(fontsize=8, loc="upper left", ncol=len(states))
    bottom.set(xlabel="seconds into the run" if "perf/time_step_s" in rows[0] else "step", ylabel="engines")
    bottom.grid(alpha=0.3)
    return True
