"""PNG plots of a results document: compile time vs layers per mode, and speed-up over ``inductor``.

"Compile time" here is the first compiled call's wall time (compile call + Dynamo + backend + one
step; imports and model build excluded): what a user waits for before the first token. Cold is
solid, warm (new process, same caches) dashed. Timeouts are drawn as an ``x`` at the timeout (a
lower bound). matplotlib is optional (``pip install layerpass[bench]``); without it
``make_plots`` raises ``ImportError`` naming it.
"""

from __future__ import annotations

import os
from typing import Any

MODE_COLORS = {"layerpass": "tab:blue", "layerpass-str": "tab:orange", "inductor": "tab:green", "regional": "tab:red"}
TIMED = ("ok", "mismatch")  # rows whose timings are real (mismatch: fast but numerically off)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib (or layerpass[bench])") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]], model: str, mode: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted((r["layers"], r[key]) for r in rows
                 if r["model"] == model and r["mode"] == mode and r["status"] in TIMED and r[key] is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def _axes(plt: Any, n: int) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    return fig, list(axes[0])


def plot_compile_time(doc: dict[str, Any], path: str) -> str:
    plt = _pyplot()
    rows = doc["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = _axes(plt, max(1, len(models)))
    for ax, model in zip(axes, models):
        for mode in modes:
            color = MODE_COLORS.get(mode)
            x, y = _series(rows, model, mode, "first_call_s")
            if x:
                ax.plot(x, y, "o-", color=color, label=f"{mode} cold")
            x, y = _series(rows, model, mode, "warm_start_s")
            if x:
                ax.plot(x, y, "s--", color=color, alpha=0.7, label=f"{mode} warm")
            to = [(r["layers"], r["timeout_s"]) for r in rows
                  if r["model"] == model and r["mode"] == mode and r["status"] == "timeout" and r["timeout_s"]]
            if to:
                ax.plot([p[0] for p in to], [p[1] for p in to], "x", color=color, markersize=10, label=f"{mode} timeout")
        failed = [f"{r['mode']} {r['status']} at {r['layers']}" for r in rows
                  if r["model"] == model and r["status"] in ("failed", "skipped")]
        if failed:  # rows with no time to plot are named, not silently missing
            ax.text(0.98, 0.02, "\n".join(failed[:8] + (["..."] if len(failed) > 8 else [])), transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=6, color="0.3")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("first call (compile) s")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("compile time vs layers (cold solid, warm dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedups(rows: list[dict[str, Any]], key: str = "first_call_s") -> list[tuple[str, str, int, float]]:
    """``(model, mode, layers, inductor_time / mode_time)`` for every timed row with a timed inductor twin."""
    base = {(r["model"], r["layers"]): r[key] for r in rows
            if r["mode"] == "inductor" and r["status"] in TIMED and r[key]}
    out = []
    for r in rows:
        b = base.get((r["model"], r["layers"]))
        if r["mode"] != "inductor" and r["status"] in TIMED and r[key] and b:
            out.append((r["model"], r["mode"], r["layers"], b / r[key]))
    return out


def plot_speedup(doc: dict[str, Any], path: str) -> str:
    plt = _pyplot()
    rows = doc["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = _axes(plt, max(1, len(models)))
    for ax, model in zip(axes, models):
        for key, style, label in (("first_call_s", "o-", "cold"), ("warm_start_s", "s--", "warm")):
            series: dict[str, list[tuple[int, float]]] = {}
            for m, mode, layers, s in speedups(rows, key):
                if m == model:
                    series.setdefault(mode, []).append((layers, s))
            for mode, pts in series.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=MODE_COLORS.get(mode),
                        label=f"{mode} {label}")
        ax.axhline(1.0, color="tab:green", linewidth=1, label="inductor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("compile-time speed-up over inductor (x)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("compile-time speed-up over plain torch.compile (inductor)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """Write ``compile_time.png`` and ``speedup_vs_inductor.png`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [plot_compile_time(doc, os.path.join(out_dir, "compile_time.png")),
            plot_speedup(doc, os.path.join(out_dir, "speedup_vs_inductor.png"))]
