"""Fleet bench: what a cold tensor-parallel launch and a second machine's first call cost, with
and without sharing the compile.

``python -m layerpass.bench.fleet [--model llama] [--layers 4] [--world 2]`` prints one table.
Each launch is ``world`` fresh processes (one gloo group, ``bench/runner.py``'s fresh-process
runner, one thread each), every one running ``layerpass.compile`` on the model's serving steps
(``layerpass/precompile.py``). Rows:

- machine A, cold, no sharing: every rank its own empty cache dirs (what a launch did before
  layerpass shared compiles);
- machine A, cold, shared dir: the ranks share one empty cache dir (a lock per key);
- machine B, first call, nothing shared: empty caches again;
- machine B, first call, via Redis: empty local caches and the remote store machine A filled
  (only where ``redis-server`` is installed; the bench starts its own on a loopback port);
- machine B, first call, via bundle: empty local caches plus ``layerpass cache import`` of the
  bundle machine A exported.

Columns: wall seconds of the launch (first process start to last exit), total CPU seconds of
all its processes, pieces compiled / loaded / waited summed over the ranks, and Dynamo seconds.
Every row is measured however slow the machine is (no budget); a failed row says why and the
table is still printed whole.

``worker`` (``python -m layerpass.bench.fleet worker ...``) is one rank of a launch; the tests
start launches through ``launch`` as the bench does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .runner import CacheDirs, FreshRunError, emit_result, run_fresh

WORKER_TIMEOUT_S = 900.0


@dataclass
class Launch:
    """One launch: its ranks' results (by rank) and the launch's wall time."""

    ranks: list[dict[str, Any]]
    wall_s: float

    def total(self, key: str) -> int:
        return sum(r["pieces"][key] for r in self.ranks)

    @property
    def cpu_s(self) -> float:
        return sum(r["cpu_s"] for r in self.ranks)


def worker_args(model: str, layers: int, *, rank: int = 0, world: int = 1, init_file: str | None = None,
                remote_cache: str | None = None, reference: bool = False,
                overrides: dict[str, int] | None = None) -> list[str]:
    args = ["-m", "layerpass.bench.fleet", "worker", "--model", model, "--layers", str(layers),
            "--rank", str(rank), "--world", str(world)]
    for name, value in (overrides or {}).items():
        args += ["--set", f"{name}={value}"]
    if init_file is not None:
        args += ["--init-file", init_file]
    if remote_cache is not None:
        args += ["--remote-cache", remote_cache]
    return args + (["--reference"] if reference else [])


def launch(model: str, layers: int, caches: Sequence[CacheDirs], *, world: int, replicas: int = 1,
           remote_cache: str | None = None, env: dict[str, str] | None = None, reference: bool = False,
           overrides: dict[str, int] | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> Launch:
    """Start ``replicas`` groups of ``world`` ranks at once (process i on ``caches[i % len(caches)]``)
    and wait for all; their results in start order."""
    init_dir = tempfile.mkdtemp(prefix="layerpass-fleet-")
    try:
        procs = []
        for g in range(replicas):
            init_file = os.path.join(init_dir, f"init{g}") if world > 1 else None
            procs += [worker_args(model, layers, rank=r, world=world, init_file=init_file, remote_cache=remote_cache,
                                  reference=reference, overrides=overrides) for r in range(world)]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(procs)) as pool:
            runs = [pool.submit(run_fresh, args, caches[i % len(caches)], use_layername=True, timeout_s=timeout_s,
                                env=env) for i, args in enumerate(procs)]
            results = [f.result() for f in runs]
        wall = time.perf_counter() - start
        return Launch([run.require(f"process {i} of {len(procs)}", timeout_s) for i, run in enumerate(results)], wall)
    finally:
        shutil.rmtree(init_dir, ignore_errors=True)


def worker(argv: Sequence[str]) -> int:
    """One rank: join the gloo group (if several), run the serving steps, emit what it did."""
    p = argparse.ArgumentParser(prog="layerpass.bench.fleet worker")
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--init-file", default=None)
    p.add_argument("--remote-cache", default=None)
    p.add_argument("--reference", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_override, metavar="FIELD=INT")
    args = p.parse_args(argv)
    import resource

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=args.world)
    from layerpass.backend.config import CompilationConfig
    from layerpass.precompile import run_serving_steps

    try:
        t0 = time.perf_counter()
        done = run_serving_steps(args.model, args.layers, CompilationConfig(remote_cache=args.remote_cache),
                                 reference=args.reference, overrides=dict(args.overrides))
        first_calls_s = time.perf_counter() - t0
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        emit_result({**done.summary(), "rank": args.rank, "first_calls_s": first_calls_s,
                     "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage),
                     "outputs": [o.tolist() for o in done.outputs],
                     "references": [r.tolist() for r in done.references]})
    finally:
        if args.world > 1:
            dist.destroy_process_group()
    return 0


def _override(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected FIELD=INT (a model config field), got {text!r}")
    return name.strip(), int(value)


@contextlib.contextmanager
def machine(tag: str, ranks: int = 1) -> Iterator[list[CacheDirs]]:
    """Empty cache dirs of one "machine": one pair shared by its ranks (``ranks=1``) or one per rank."""
    root = tempfile.mkdtemp(prefix=f"layerpass-fleet-{tag}-")
    dirs = [CacheDirs(os.path.join(root, f"layerpass{r}"), os.path.join(root, f"inductor{r}")) for r in range(ranks)]
    try:
        yield dirs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _row(what: str, run: Launch | None, error: str = "") -> dict[str, Any]:
    if run is None:
        return {"row": what, "status": f"failed: {error}"[:160]}
    return {"row": what, "status": "ok", "wall_s": run.wall_s, "cpu_s": run.cpu_s, "compiled": run.total("compiled"),
            "loaded": run.total("loaded"), "waited": run.total("waited"),
            "dynamo_s": sum(r["dynamo_s"] for r in run.ranks), "warm_start": run.ranks[0]["warm_start"]}


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [title, "", "| launch | status | wall s | CPU s (all ranks) | compiled | loaded | waited | Dynamo s | warm start (rank 0) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['row']} | {r['status']} | - | - | - | - | - | - | - |")
            continue
        lines.append(f"| {r['row']} | ok | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['compiled']} | {r['loaded']} | "
                     f"{r['waited']} | {r['dynamo_s']:.1f} | {r['warm_start'][:60]} |")
    return "\n".join(lines)


def _measure(rows: list[dict[str, Any]], what: str, fn: Any) -> Launch | None:
    try:
        run = fn()
    except (FreshRunError, OSError, RuntimeError) as e:
        rows.append(_row(what, None, str(e).splitlines()[0] if str(e) else type(e).__name__))
        return None
    rows.append(_row(what, run))
    print(f"fleet bench: {what}: done in {run.wall_s:.1f} s", file=sys.stderr, flush=True)
    return run


def bench(model: str, layers: int, world: int) -> list[dict[str, Any]]:
    """Every row of the table (see the module docstring)."""
    from layerpass.envs import CACHE_SECRET_ENV

    secret = os.environ.get(CACHE_SECRET_ENV) or secrets.token_hex(16)
    env = {CACHE_SECRET_ENV: secret}
    rows: list[dict[str, Any]] = []
    with machine("a-apart", ranks=world) as apart:
        _measure(rows, f"A: cold TP={world}, no sharing (a cache dir per rank)",
                 lambda: launch(model, layers, apart, world=world, env=env))
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(_redis_or_none())
        remote = None if redis is None else redis.url
        shared = stack.enter_context(machine("a-shared"))
        _measure(rows, f"A: cold TP={world}, shared cache dir" + (" + Redis" if remote else ""),
                 lambda: launch(model, layers, shared, world=world, env=env, remote_cache=remote))
        bundle = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "bundle.tar")
        exported = subprocess.run([sys.executable, "-m", "layerpass", "cache", "export", "--all", "-o", bundle,
                                   "--cache-dir", shared[0].layerpass],
                                  env={**os.environ, **env}, capture_output=True, text=True)
        with machine("b-empty") as b:
            _measure(rows, f"B: first call TP={world}, own empty cache dir", lambda: launch(model, layers, b, world=world, env=env))
        if remote is not None:
            with machine("b-redis") as b:
                _measure(rows, f"B: first call TP={world}, via Redis",
                         lambda: launch(model, layers, b, world=world, env=env, remote_cache=remote))
        else:
            rows.append({"row": f"B: first call TP={world}, via Redis", "status": "skipped: no redis-server on PATH"})
        with machine("b-bundle") as b:
            def via_bundle() -> Launch:
                if exported.returncode != 0:
                    raise RuntimeError(f"cache export failed: {exported.stderr.strip()[-200:]}")
                imported = subprocess.run([sys.executable, "-m", "layerpass", "cache", "import", bundle, "--cache-dir",
                                           b[0].layerpass], env={**os.environ, **env}, capture_output=True, text=True)
                if imported.returncode != 0:
                    raise RuntimeError(f"cache import failed: {(imported.stderr or imported.stdout).strip()[-200:]}")
                return launch(model, layers, b, world=world, env=env)
            _measure(rows, f"B: first call TP={world}, via bundle", via_bundle)
    return rows


@contextlib.contextmanager
def _redis_or_none() -> Iterator[Any]:
    from .redis_server import redis_server_path, running_redis

    if redis_server_path() is None:
        yield None
        return
    with running_redis() as server:
        yield server


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(prog="python -m layerpass.bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama", help="zoo model or hf-config:PATH (default llama)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--world", type=int, default=2, help="tensor-parallel ranks per launch (default 2)")
    args = p.parse_args(argv)
    rows = bench(args.model, args.layers, args.world)
    print(markdown(rows, f"Fleet: {args.model}, {args.layers} layers, TP={args.world} "
                         f"(`python -m layerpass.bench.fleet --model {args.model} --layers {args.layers} "
                         f"--world {args.world}`)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
