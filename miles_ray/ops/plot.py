"""``miles-ray plot RUN_DIR``: PNGs of a run from its ``metrics.jsonl``.

:data:`PLOTS` maps each file name to a small function drawing on a figure; a function returns
False when the run has none of its metrics (an IS-weight plot for a synchronous run), and that file
is not written. Matplotlib runs headless (Agg).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from miles_ray.ops.rundir import keys_with, metrics_rows, series


def _rolling(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _lines(ax, rows: list[dict], keys: list[str], ylabel: str, **kw) -> bool:
    drawn = False
    for key in keys:
        x, y = series(rows, key)
        if x:
            ax.plot(x, y, label=key, **kw)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return drawn


def plot_reward(fig, rows: list[dict]) -> bool:
    """Mean reward per step, its 10-step rolling mean, and eval rewards if any."""
    ax = fig.add_subplot()
    x, y = series(rows, "rollout/reward_mean")
    if not x:
        return False
    ax.plot(x, y, lw=0.8, alpha=0.6, label="rollout/reward_mean")
    ax.plot(x, _rolling(y), lw=2, label="10-step rolling mean")
    for key in [k for k in keys_with(rows, "eval/") if "reward" in k]:
        ex, ey = series(rows, key)
        ax.plot(ex, ey, "o-", label=key)
    ax.set(xlabel="step", ylabel="reward", title="Reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return True


def plot_response_length(fig, rows: list[dict]) -> bool:
    ax = fig.add_subplot()
    ax.set_title("Response length (tokens)")
    return _lines(ax, rows, ["rollout/response_len_mean"], "tokens")


def plot_kl_mismatch(fig, rows: list[dict]) -> bool:
    """KL to the reference (top) and rollout-vs-trainer log-prob mismatch (bottom, symlog)."""
    kl_ax, mm_ax = fig.subplots(2, 1, sharex=True)
    kl_ax.set_title("KL and train/rollout mismatch")
    kl = _lines(kl_ax, rows, [k for k in ("train/kl", "train/kl_reward_penalty", "async/kl_behav_prox")
                              if series(rows, k)[0]], "KL")
    mm = _lines(mm_ax, rows, keys_with(rows, "train/mismatch_"), "|logp rollout - logp trainer|")
    mm_ax.set_yscale("symlog", linthresh=1e-6)
    return kl or mm


def plot_is_weights(fig, rows: list[dict]) -> bool:
    """Importance weights of decoupled PPO (async off-policy correction) and the clipped fractions."""
    w_ax, f_ax = fig.subplots(2, 1, sharex=True)
    w_ax.set_title("Importance-sampling weights")
    w = _lines(w_ax, rows, keys_with(rows, "async/is_weight_"), "weight")
    f = _lines(f_ax, rows, keys_with(rows, "async/is_frac_"), "fraction of tokens")
    return w or f


def plot_staleness(fig, rows: list[dict]) -> bool:
    ax = fig.add_subplot()
    ax.set_title("Staleness (policy versions a sample lags)")
    return _lines(ax, rows, ["async/staleness_mean", "async/staleness_max"], "versions")


def plot_tokens_per_s(fig, rows: list[dict]) -> bool:
    """Rollout throughput (top) and the seconds of each phase of a step (bottom)."""
    tok_ax, t_ax = fig.subplots(2, 1, sharex=True)
    tok_ax.set_title("Rollout tokens/s and step time")
    tok = _lines(tok_ax, rows, ["perf/rollout_tokens_per_s"], "tokens/s")
    times = _lines(t_ax, rows, keys_with(rows, "perf/time_"), "seconds")
    return tok or times


def plot_faults(fig, rows: list[dict]) -> bool:
    """A wall-clock timeline (cumulative step seconds): recoveries (bars: each one's duration),
    actor restarts, engines ready, and any other fault/ counter."""
    from miles_ray.ops.timeline import fault_timeline

    return fault_timeline(fig, rows)


PLOTS: dict[str, Callable] = {
    "reward.png": plot_reward,
    "response_length.png": plot_response_length,
    "kl_mismatch.png": plot_kl_mismatch,
    "is_weights.png": plot_is_weights,
    "staleness.png": plot_staleness,
    "tokens_per_s.png": plot_tokens_per_s,
    "faults.png": plot_faults,
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path | None]:
    """Write every plot of :data:`PLOTS` that has data into ``out_dir`` (default
    ``RUN_DIR/plots``); returns file name -> path written (None: no data for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics_rows(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | None] = {}
    for name, draw in PLOTS.items():
        fig = plt.figure(figsize=(8, 5), dpi=100)
        written[name] = out / name if draw(fig, rows) else None
        if written[name]:
            fig.tight_layout()
            fig.savefig(written[name])
        plt.close(fig)
    return written
