"""One compile for the fleet, end to end: processes that share a cache dir (TP ranks, replicas
started together) compile each distinct piece once between them; a second machine loads through a
real Redis or a bundle; every fault of the shared store degrades to a local compile.

The launches are fresh processes (``bench/fleet.py``, as the fleet bench runs them); the fault
cases compile in this process on fresh cache dirs (Inductor's own cache is warm, so each costs
seconds) and check the warning, the local compile and the output.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from layerpass.bench.fleet import Launch, launch, machine, worker_args
from layerpass.bench.runner import run_fresh
from tests.helpers import backend as bh
from tests.helpers import redis_server as rh

MODEL, LAYERS = "llama", 4
SHAPE = {"num_kv_heads": 4}  # 4 KV heads: the zoo llama's 4 heads split over up to 4 ranks
SECRET = "fleet-test-secret"
ENV = {"LAYERPASS_CACHE_SECRET": SECRET}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_rank() -> Launch:
    """TP=1 on its own empty caches: the outputs every launch must give and the distinct pieces."""
    with machine("tp1") as dirs:
        run = launch(MODEL, LAYERS, dirs, world=1, env=ENV, reference=True, overrides=SHAPE)
    assert run.total("compiled") > 0 and run.ranks[0]["max_abs_err"] < 1e-4
    return run


def assert_outputs_equal(run: Launch, expected: Launch) -> None:
    for r in run.ranks:
        for out, ref in zip(r["outputs"], expected.ranks[0]["outputs"]):
            torch.testing.assert_close(torch.tensor(out), torch.tensor(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("world", [2, 4])
def test_tp_ranks_sharing_a_dir_compile_each_piece_once(world, one_rank):
    with machine(f"tp{world}") as dirs:
        cold = launch(MODEL, LAYERS, dirs, world=world, env=ENV, overrides=SHAPE)
        assert cold.total("compiled") == one_rank.total("compiled"), [r["pieces"] for r in cold.ranks]
        # the ranks' programs have one key too: each distinct region is traced by one rank, loaded by the others
        assert sum(r["regions_traced"] for r in cold.ranks) == one_rank.ranks[0]["regions_traced"] > 0
        assert sum(r["regions_loaded"] for r in cold.ranks) == (world - 1) * one_rank.ranks[0]["regions_traced"]
        assert cold.total("compiled") + cold.total("waited") + cold.total("loaded") == world * one_rank.total("compiled")
        assert_outputs_equal(cold, one_rank)
        warm = launch(MODEL, LAYERS, dirs, world=world, env=ENV, overrides=SHAPE)
    assert warm.total("compiled") == 0 and warm.total("loaded") == world * one_rank.total("compiled")
    assert all(r["warm_start"] == "loaded" and r["dynamo_s"] == 0 for r in warm.ranks)
    assert_outputs_equal(warm, one_rank)


def test_replicas_started_together_compile_each_piece_once(one_rank):
    with machine("replicas") as dirs:
        run = launch(MODEL, LAYERS, dirs, world=1, replicas=4, env=ENV, overrides=SHAPE)
    assert run.total("compiled") == one_rank.total("compiled"), [r["pieces"] for r in run.ranks]
    assert sum(r["regions_traced"] for r in run.ranks) == one_rank.ranks[0]["regions_traced"]
    assert_outputs_equal(run, one_rank)


def _lock_holder(cache_dir: str) -> int | None:
    for dirpath, _, files in os.walk(os.path.join(cache_dir, "locks")):
        for f in files:
            with open(os.path.join(dirpath, f)) as fh:
                text = fh.read()
            if text.startswith("pid "):
                return int(text.split()[1])
    return None


def test_a_compiler_killed_mid_compile_does_not_stall_the_others(one_rank):
    with machine("killed") as dirs:
        results: dict[int, object] = {}

        def run(i: int) -> None:
            results[i] = run_fresh(worker_args(MODEL, LAYERS, overrides=SHAPE), dirs[0], use_layername=True, timeout_s=600,
                                   env=ENV)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        victim = None
        while victim is None and time.monotonic() - t0 < 300:
            victim = _lock_holder(dirs[0].layerpass)
            time.sleep(0.05)
        assert victim is not None, "no process took a lock"
        os.kill(victim, signal.SIGKILL)  # while it holds the lock: tracing or compiling
        for t in threads:
            t.join()
    killed = [r for r in results.values() if r.returncode == -signal.SIGKILL]
    survivors = [r for r in results.values() if r.returncode == 0]
    assert len(killed) == 1 and len(survivors) == 1, [r.returncode for r in results.values()]
    result = survivors[0].result
    assert result["pieces"]["compiled"] + result["pieces"]["waited"] + result["pieces"]["loaded"] == one_rank.total("compiled")
    # it waited only as long as the victim lived: at most its own compile plus the victim's head start
    assert survivors[0].wall_s < 2 * one_rank.wall_s + 60, (survivors[0].wall_s, one_rank.wall_s)
    for out, ref in zip(result["outputs"], one_rank.ranks[0]["outputs"]):
        torch.testing.assert_close(torch.tensor(out), torch.tensor(ref), atol=1e-4, rtol=1e-4)


def test_a_second_machine_loads_through_redis(one_rank, redis_server):
    with machine("a") as a, machine("b") as b:
        first = launch(MODEL, LAYERS, a, world=1, env=ENV, remote_cache=redis_server.url, overrides=SHAPE)
        assert first.total("compiled") == one_rank.total("compiled")
        second = launch(MODEL, LAYERS, b, world=1, env=ENV, remote_cache=redis_server.url, reference=True,
                        overrides=SHAPE)
        [rank] = second.ranks
        assert rank["warm_start"] == "loaded" and rank["dynamo_s"] == 0, rank["warm_start"]
        assert rank["pieces"] == {"compiled": 0, "loaded": one_rank.total("compiled"), "waited": 0}
        assert rank["max_abs_err"] < 1e-4
        assert_outputs_equal(second, one_rank)
        # the remote hits were written to B's own dir: B now starts warm without the store
        local = launch(MODEL, LAYERS, b, world=1, env=ENV, overrides=SHAPE)
        assert local.ranks[0]["warm_start"] == "loaded" and local.total("compiled") == 0


def test_a_second_machine_loads_through_a_bundle(one_rank, tmp_path):
    bundle = str(tmp_path / "llama4.tar")
    env = bh.subprocess_env(**ENV)
    with machine("a") as a, machine("b") as b:
        launch(MODEL, LAYERS, a, world=1, env=ENV)  # the zoo's own shape: what `cache export --model` builds
        export = run_cli(["cache", "export", "--model", MODEL, "--layers", str(LAYERS), "-o", bundle,
                             "--cache-dir", a[0].layerpass], env=env)
        assert export.returncode == 0, export.stderr
        imported = run_cli(["cache", "import", bundle, "--cache-dir", b[0].layerpass], env=env)
        assert imported.returncode == 0, imported.stderr
        second = launch(MODEL, LAYERS, b, world=1, env=ENV, reference=True)
    [rank] = second.ranks
    assert rank["warm_start"] == "loaded" and rank["dynamo_s"] == 0
    assert rank["pieces"] == {"compiled": 0, "loaded": one_rank.total("compiled"), "waited": 0}
    assert rank["max_abs_err"] < 1e-4


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerpass", *args], env=env, capture_output=True, text=True,
                          timeout=600)


# -- faults of the shared store: a warning, a local compile, the right output, no hang ---------------

def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "layerpass"]


def _compile_with(remote: str | None, monkeypatch, secret: str | None = SECRET, **kw) -> bh.Compiled:
    if secret is None:
        monkeypatch.delenv("LAYERPASS_CACHE_SECRET", raising=False)
    else:
        monkeypatch.setenv("LAYERPASS_CACHE_SECRET", secret)
    return bh.compile_zoo("llama", 2, remote_cache=remote, **kw)


def _assert_local_compile(c: bh.Compiled) -> None:
    assert c.report.num_compiled == c.report.num_unique_pieces > 0
    bh.assert_matches(c.out, c.ref)


def test_fault_wrong_port(monkeypatch, caplog):
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        c = _compile_with(rh.closed_port_url(), monkeypatch)
    _assert_local_compile(c)
    assert time.monotonic() - t0 < 120
    assert len([w for w in _warnings(caplog) if "remote" in w]) == 1, _warnings(caplog)


@pytest.mark.parametrize("secret,expect", [(None, "LAYERPASS_CACHE_SECRET"), ("another-secret", "refused")])
def test_fault_no_or_wrong_secret(secret, expect, monkeypatch, caplog, redis_server):
    _compile_with(redis_server.url, monkeypatch)  # fills the store with SECRET's entries
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        c = _compile_with(redis_server.url, monkeypatch, secret=secret)
    _assert_local_compile(c)
    warnings = _warnings(caplog)
    assert warnings and all(expect in w for w in warnings if "remote" in w), warnings
    if secret is None:
        assert len(warnings) == 1


def test_fault_corrupted_value(monkeypatch, caplog, redis_server):
    first = _compile_with(redis_server.url, monkeypatch)
    client = redis_server.client()
    [key] = [k for k in client.keys(b"layerpass:artifacts/*/artifact.bin")][:1] or [None]
    assert key is not None, "no artifact reached the store"
    value = bytearray(client.get(key))
    value[-1] ^= 0xFF
    client.set(key, bytes(value))
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        c = _compile_with(redis_server.url, monkeypatch)
    bh.assert_matches(c.out, c.ref)
    assert c.report.num_compiled == 1 and c.report.num_cache_hits == first.report.num_unique_pieces - 1
    refused = [w for w in _warnings(caplog) if "refused" in w]
    assert len(refused) == 1 and key.decode().split(":", 1)[1] in refused[0], _warnings(caplog)


def test_fault_redis_stopped_mid_run(monkeypatch, caplog, redis_server):
    from layerpass.passes.base import LayerpassPass

    class StopRedis(LayerpassPass):
        """Stops the server while the first piece compiles: its store, and all after, find it gone."""

        name = "stop_redis"

        def apply(self, graph) -> int:
            redis_server.stop()
            return 0

        def uuid(self) -> str:
            return "stop-redis"

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        c = _compile_with(redis_server.url, monkeypatch,
                          setup=lambda cm: cm.backend.pass_manager.add_pass(StopRedis()))
    _assert_local_compile(c)
    assert time.monotonic() - t0 < 120
    assert len([w for w in _warnings(caplog) if "remote" in w]) == 1, _warnings(caplog)


def test_precompile_fills_a_cache_the_next_process_only_loads(tmp_path):
    with machine("pre") as dirs:
        proc = run_cli(["precompile", MODEL, "--layers", "2", "--cache-dir", dirs[0].layerpass],
                       env=bh.subprocess_env(TORCHINDUCTOR_CACHE_DIR=dirs[0].inductor))
        assert proc.returncode == 0, proc.stderr
        assert "layerpass precompile: llama, 2 layers" in proc.stdout and "'compiled': 0" not in proc.stdout, proc.stdout
        served = launch(MODEL, 2, dirs, world=1, env=ENV, reference=True)
    [rank] = served.ranks
    assert rank["warm_start"] == "loaded" and rank["pieces"]["compiled"] == 0 and rank["dynamo_s"] == 0
    assert rank["max_abs_err"] < 1e-4
