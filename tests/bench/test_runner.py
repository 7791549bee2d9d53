"""``bench/runner.py``: the one fresh-process runner. Children here are tiny ``python -c`` scripts."""

from __future__ import annotations

import os
import shutil
import textwrap
import time

import pytest

from layerpass.bench.runner import RESULT_PREFIX, FreshRunError, fresh_cache_dirs, run_cold, run_fresh

REPORT_ENV = textwrap.dedent("""\
    import os
    from layerpass.bench.runner import emit_result
    print("chatter before the result")
    emit_result({k: os.environ.get(k) for k in ("LAYERPASS_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "VLLM_USE_LAYERNAME",
                                                "PYTHONUNBUFFERED", "LAYERPASS_DEBUG_DUMP", "EXTRA")})
""")


def test_the_child_gets_the_caches_and_switch_and_its_result_is_read(monkeypatch) -> None:
    monkeypatch.setenv("LAYERPASS_DEBUG_DUMP", "/tmp/dump")  # never inherited: it would slow the timed compile
    with fresh_cache_dirs() as caches:
        assert os.listdir(caches.layerpass) == [] and os.listdir(caches.inductor) == []
        run = run_fresh(["-c", REPORT_ENV], caches, use_layername=False, timeout_s=60, env={"EXTRA": "x"})
    assert not os.path.exists(caches.layerpass) and not os.path.exists(caches.inductor)  # removed after
    assert not run.timed_out and run.returncode == 0 and run.wall_s > 0
    assert run.result == {"LAYERPASS_CACHE_DIR": caches.layerpass, "TORCHINDUCTOR_CACHE_DIR": caches.inductor,
                          "VLLM_USE_LAYERNAME": "0", "PYTHONUNBUFFERED": "1", "LAYERPASS_DEBUG_DUMP": None, "EXTRA": "x"}
    assert run.require("child", 60) is run.result


def test_kept_cache_dirs_stay() -> None:
    with fresh_cache_dirs(keep=True) as caches:
        pass
    try:
        assert os.path.isdir(caches.layerpass) and os.path.isdir(caches.inductor)
    finally:
        shutil.rmtree(os.path.dirname(caches.layerpass))


def test_the_last_whole_result_line_wins() -> None:
    script = (f"print({RESULT_PREFIX!r} + '{{\"n\": 1}}'); print({RESULT_PREFIX!r} + '{{\"n\": 2}}'); "
              f"print({RESULT_PREFIX!r} + '{{\"n\": ')")  # the last one cut short, as by a crash
    with fresh_cache_dirs() as caches:
        assert run_fresh(["-c", script], caches, use_layername=True, timeout_s=60).result == {"n": 2}


def test_a_failing_child_is_named_with_its_last_line() -> None:
    with fresh_cache_dirs() as caches:
        run = run_fresh(["-c", "import sys; print('out'); sys.exit('the reason it failed')"], caches,
                        use_layername=True, timeout_s=60)
    assert (run.timed_out, run.returncode, run.result) == (False, 1, None)
    assert run.last_output_line() == "the reason it failed"
    with pytest.raises(FreshRunError) as e:
        run.require("the child", 60)
    assert e.value.reason == "the child failed with exit code 1: the reason it failed"
    assert "the reason it failed" in str(e.value)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the grandchild's state from /proc")
def test_a_hung_child_is_killed_with_its_process_group(tmp_path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""\
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(60)
    """)
    t = time.perf_counter()
    with fresh_cache_dirs() as caches:
        run = run_fresh(["-c", script], caches, use_layername=True, timeout_s=2)
    assert run.timed_out and run.returncode is None and run.result is None and time.perf_counter() - t < 30
    with pytest.raises(FreshRunError, match="^the child exceeded 2 s$"):
        run.require("the child", 2)
    stat = f"/proc/{int(pid_file.read_text())}/stat"
    for _ in range(50):  # killed: gone, or a zombie waiting for whoever adopted it
        try:
            with open(stat) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived its process group's timeout")


def test_run_cold_returns_the_result_and_the_wall_time() -> None:
    result, wall = run_cold(["-c", "from layerpass.bench.runner import emit_result; emit_result({'ok': True})"],
                            use_layername=True, timeout_s=60, what="child")
    assert result == {"ok": True} and 0 < wall < 60
    with pytest.raises(FreshRunError, match="child failed with exit code 0: no output"):
        run_cold(["-c", "pass"], use_layername=True, timeout_s=60, what="child")
