"""What a sweep's rows say: the Markdown table (with its legend) and the acceptance ratios.

``acceptance_ratios(rows)`` computes, from one run's rows, the ratios issue 14's acceptance asks
for (llama ``layerpass`` cold first call deep vs shallow, ``dynamo_s`` deep vs shallow, warm vs cold,
warm vs inductor's warm, inductor's cold vs layerpass's cold for llama and llama-fp8). A ratio is
computed only when the rows it needs exist with status ``ok``. "Deep" and "shallow" are the largest
and smallest layer counts measured for that model's ``layerpass`` rows; the acceptance targets are
defined for 80 vs 2 layers, so ``meets`` is judged only there (``null`` otherwise).

``results_markdown(doc)`` is what the sweep prints and writes as ``results.md``: table, legend,
notes on rows that are not ok or whose warm path fell back, the ratios, and the machine line.
"""

from __future__ import annotations

from typing import Any

ACCEPT_DEEP = 80
ACCEPT_SHALLOW = 2

# key, model, description ({deep}/{shallow} filled in), numerator, denominator, comparison, bound.
# numerator/denominator: (mode, row field, "deep" | "shallow").
_LP_COLD, _LP_WARM, _IND_COLD, _IND_WARM = (("layerpass", "first_call_s"), ("layerpass", "warm_start_s"),
                                            ("inductor", "first_call_s"), ("inductor", "warm_start_s"))
_FIRST_CALL = "first call, {deep} layers"
RATIO_SPECS: tuple[tuple[str, str, str, tuple[str, str, str], tuple[str, str, str], str, float], ...] = (
    ("cold_deep_vs_shallow", "llama", "layerpass cold first call, {deep} vs {shallow} layers", (*_LP_COLD, "deep"), (*_LP_COLD, "shallow"), "<=", 1.15),
    ("dynamo_deep_vs_shallow", "llama", "layerpass dynamo s (cold), {deep} vs {shallow} layers", ("layerpass", "dynamo_s", "deep"), ("layerpass", "dynamo_s", "shallow"), "<=", 4.0),
    ("warm_vs_cold", "llama", "layerpass warm first call / cold " + _FIRST_CALL, (*_LP_WARM, "deep"), (*_LP_COLD, "deep"), "<=", 0.15),
    ("warm_vs_inductor_warm", "llama", "layerpass warm first call / inductor warm " + _FIRST_CALL, (*_LP_WARM, "deep"), (*_IND_WARM, "deep"), "<=", 0.25),
    ("inductor_cold_vs_layerpass_cold", "llama", "inductor cold first call / layerpass cold " + _FIRST_CALL, (*_IND_COLD, "deep"), (*_LP_COLD, "deep"), ">=", 4.5),
    ("inductor_cold_vs_layerpass_cold", "llama-fp8", "inductor cold first call / layerpass cold " + _FIRST_CALL, (*_IND_COLD, "deep"), (*_LP_COLD, "deep"), ">=", 6.0),
)
RATIO_FIELDS = ("key", "model", "what", "deep", "shallow", "value", "numerator", "denominator", "target", "meets")

LEGEND = """\
- **cold first call**: wall time of the first compiled call in a fresh process with empty layerpass and
  Inductor caches: `layerpass.compile` / `torch.compile` + Dynamo + backend compile + one step, excluding
  interpreter start-up, imports, model build and the eager reference run. Inductor's modules are imported
  before the clock in every mode (`inductor_import_s` in results.json); its per-process CPU ISA probe is
  inside the first call.
- **dynamo s**: Dynamo tracing (compile start to backend entry, summed over graphs); **compile s**: backend time.
- **warm first call**: the same first call in a second fresh process on the same (now filled) caches: what a
  restarted server pays.
- **traced** (layerpass modes, cold process): `CompileReport.trace`; `regions (N)`: each distinct decoder
  layer traced once, N distinct region traces; `whole-model`: every layer traced.
- **warm path** (layerpass modes, warm process): `CompileReport.warm_start`; `loaded`: the saved traced program
  was loaded and Dynamo skipped; `fallback`: a normal compile (the reason is listed below); `off`: disabled.
- `-`: not measured, or not a layerpass mode. Every measurement is single-threaded (one torch thread, one
  Inductor compile thread) and runs alone unless `--jobs` says otherwise."""


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(r["model"], r["layers"], r["mode"]): r for r in rows if r.get("status") == "ok"}


def acceptance_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The acceptance ratios that this run's ``ok`` rows allow, as plain JSON objects (``RATIO_FIELDS``)."""
    ok = _index(rows)
    out: list[dict[str, Any]] = []
    for key, model, what, num, den, op, bound in RATIO_SPECS:
        depths = sorted({n for (m, n, mode) in ok if m == model and mode == "layerpass"})
        if not depths:
            continue
        deep, shallow = depths[-1], depths[0]
        if "shallow" in (num[2], den[2]) and shallow == deep:
            continue  # a deep-vs-shallow ratio needs two depths

        def value(spec: tuple[str, str, str]) -> float | None:
            row = ok.get((model, deep if spec[2] == "deep" else shallow, spec[0]))
            return None if row is None else row.get(spec[1])

        a, b = value(num), value(den)
        if a is None or not b:
            continue
        ratio = a / b
        judged = deep == ACCEPT_DEEP and ("shallow" not in (num[2], den[2]) or shallow == ACCEPT_SHALLOW)
        out.append({
            "key": key, "model": model, "what": what.format(deep=deep, shallow=shallow), "deep": deep,
            "shallow": shallow if "shallow" in (num[2], den[2]) else None, "value": ratio, "numerator": a,
            "denominator": b, "target": f"{op} {bound:g}",
            "meets": (ratio <= bound if op == "<=" else ratio >= bound) if judged else None,
        })
    return out


def validate_ratios(ratios: Any) -> None:
    """Raise ``ValueError`` if ``ratios`` is not a list of ratio objects."""
    if not isinstance(ratios, list):
        raise ValueError(f"results.json 'ratios' must be a list, got {type(ratios).__name__}")
    for r in ratios:
        if not isinstance(r, dict) or set(r) != set(RATIO_FIELDS):
            raise ValueError(f"a ratio must be an object with exactly {', '.join(RATIO_FIELDS)}, got {r!r}")
        if not isinstance(r["value"], (int, float)) or isinstance(r["value"], bool):
            raise ValueError(f"ratio {r['key']!r} value must be a number, got {r['value']!r}")
        if r["meets"] is not None and not isinstance(r["meets"], bool):
            raise ValueError(f"ratio {r['key']!r} meets must be true, false or null, got {r['meets']!r}")


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _short(status: str | None) -> str:
    """``fallback: why`` -> ``fallback`` (the why goes to the notes)."""
    return "-" if status is None else status.split(":", 1)[0].strip()


def traced_cell(row: dict[str, Any]) -> str:
    trace = row.get("trace")
    if trace is None:
        return "-"
    return f"{trace} ({row['num_regions']})" if trace == "regions" and row.get("num_regions") is not None else trace


HEAD = ("model", "layers", "mode", "status", "cold first call s", "dynamo s (cold)", "compile s (cold)",
        "warm first call s", "dynamo s (warm)", "traced", "warm path", "pieces (unique / compiled)", "fusions",
        "max abs err", "step ms compiled / eager")


def markdown_table(doc: dict[str, Any], *, legend: bool = True, ratios: bool = True) -> str:
    """The results as Markdown: the table, its legend, notes on rows that are not ok, the ratios, the machine."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "|".join("---" for _ in HEAD) + "|"]
    notes = []
    for r in doc["rows"]:
        pieces = "-" if r["pieces"] is None else f"{r['pieces']} ({r['unique_pieces']} / {r['compiled_pieces']})"
        steps = "-" if r["step_ms_compiled"] is None else f"{r['step_ms_compiled']:.2f} / {r['step_ms_eager']:.2f}"
        lines.append("| " + " | ".join((
            r["model"], str(r["layers"]), r["mode"], r["status"], _fmt(r["first_call_s"], ".1f"),
            _fmt(r["dynamo_s"], ".1f"), _fmt(r["compile_s"], ".1f"), _fmt(r["warm_start_s"], ".1f"),
            _fmt(r.get("warm_dynamo_s"), ".1f"), traced_cell(r), _short(r.get("warm_warm_start")), pieces,
            _fmt(r["fusion_matches_total"], "d"), _fmt(r["max_abs_err"], ".1e"), steps)) + " |")
        where = f"{r['model']} / {r['layers']} layers / {r['mode']}"
        if r["status"] != "ok":
            notes.append(f"- {where}: **{r['status']}**: {r['reason']}")
        ws = r.get("warm_warm_start")  # the cold process falls back by design (nothing saved yet)
        if ws and ws.startswith("fallback"):
            notes.append(f"- {where}: warm process, warm path **{ws}**")
    out = lines
    if legend:
        out += ["", LEGEND]
    if notes:
        out += [""] + notes
    if ratios:
        text = ratios_markdown(doc.get("ratios") if doc.get("ratios") is not None else acceptance_ratios(doc["rows"]))
        if text:
            out += ["", text]
    m = doc.get("machine", {})
    load = m.get("loadavg_start")
    load = [round(x, 1) for x in load] if load else load
    cfg = doc.get("config", {})
    sweep = f" ({cfg['sweep']} sweep, {cfg.get('jobs')} at a time)" if cfg.get("sweep") else ""
    out.append(f"\nMachine: {m.get('cpu')} ({m.get('cpu_count')} cores), torch {m.get('torch')}, "
               f"load average at start {load}; sweep wall time {doc.get('wall_s', 0):.0f} s{sweep}.")
    if cfg.get("command"):
        out.append(f"Command: `{cfg['command']}`.")
    return "\n".join(out)


def ratios_markdown(ratios: list[dict[str, Any]]) -> str:
    """The ratios as a Markdown table ("" when there are none)."""
    if not ratios:
        return ""
    lines = [f"Acceptance ratios (issue 14), from this run (targets are for {ACCEPT_DEEP} vs {ACCEPT_SHALLOW} layers):",
             "", "| model | ratio | value | target | meets |", "|---|---|---|---|---|"]
    for r in ratios:
        meets = {True: "yes", False: "**no**", None: f"n/a (not {ACCEPT_DEEP} vs {ACCEPT_SHALLOW} layers)"}[r["meets"]]
        lines.append(f"| {r['model']} | {r['what']} | {r['value']:.2f}x ({r['numerator']:.2f} / {r['denominator']:.2f}) "
                     f"| {r['target']} | {meets} |")
    return "\n".join(lines)
