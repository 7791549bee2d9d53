"""The one way a benchmark runs a measurement: a fresh Python process on given cache directories.

Why a fresh process: Dynamo, Inductor and layerpass keep in-process caches, and
``VLLM_USE_LAYERNAME`` is read at import; only a new interpreter measures what a user's first (or
restarted) run pays. The child is ``python <args>`` in its own process group, with
``LAYERPASS_CACHE_DIR`` and ``TORCHINDUCTOR_CACHE_DIR`` pointing at the directories given (empty
ones from ``fresh_cache_dirs`` for a cold start; the same ones again for a warm start). It reports
by printing one line ``RESULT_PREFIX + json`` (``emit_result``); the runner reads the last such
line of its stdout. A child over its time limit is killed with its whole process group (compile
workers too), and the caller decides what that means for its table.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RESULT_PREFIX = "LAYERPASS_BENCH_RESULT "
TAIL_CHARS = 4000  # output kept for error messages
# Never inherited: a debug dump would put graph writes inside the timed compile.
DROPPED_ENV = ("LAYERPASS_DEBUG_DUMP",)


class FreshRunError(RuntimeError):
    """A child that timed out, failed or printed no result: ``reason`` in one line, ``str()`` with its stderr."""

    def __init__(self, reason: str, stderr_tail: str = "") -> None:
        super().__init__(f"{reason}\n{stderr_tail}" if stderr_tail else reason)
        self.reason = reason


@dataclass(frozen=True)
class CacheDirs:
    """The two caches a compile fills: layerpass's artifacts and Inductor's."""

    layerpass: str
    inductor: str


@dataclass(frozen=True)
class FreshRun:
    """What one child process did."""

    timed_out: bool
    returncode: int | None  # None when it was killed at its limit
    wall_s: float
    result: dict[str, Any] | None  # the child's last result line, if it printed one
    stdout_tail: str
    stderr_tail: str

    def last_output_line(self) -> str:
        """The last non-empty line the child wrote (stderr first: that is where a traceback ends)."""
        for text in (self.stderr_tail, self.stdout_tail):
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        return "no output"

    def require(self, what: str, timeout_s: float) -> dict[str, Any]:
        """The child's result; ``FreshRunError`` naming ``what`` if it timed out, failed or printed none."""
        if self.timed_out:
            raise FreshRunError(f"{what} exceeded {timeout_s:.0f} s")
        if self.returncode != 0 or self.result is None:
            raise FreshRunError(f"{what} failed with exit code {self.returncode}: {self.last_output_line()[:250]}",
                                self.stderr_tail[-3000:])
        return self.result


def emit_result(result: Mapping[str, Any]) -> None:
    """Called in the child: print the result line the runner reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


@contextlib.contextmanager
def fresh_cache_dirs(keep: bool = False) -> Iterator[CacheDirs]:
    """Two new empty cache directories, removed on exit unless ``keep``."""
    root = tempfile.mkdtemp(prefix="layerpass-bench-")
    caches = CacheDirs(os.path.join(root, "layerpass"), os.path.join(root, "inductor"))
    os.makedirs(caches.layerpass)
    os.makedirs(caches.inductor)
    try:
        yield caches
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def child_env(caches: CacheDirs, *, use_layername: bool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: ``extra`` added, the caches and the switch set."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(extra or {})
    env.update({"LAYERPASS_CACHE_DIR": caches.layerpass, "TORCHINDUCTOR_CACHE_DIR": caches.inductor,
                "VLLM_USE_LAYERNAME": "1" if use_layername else "0",
                "PYTHONUNBUFFERED": "1"})  # what a killed child printed is in the log
    return env


def _read_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
                return json.loads(line[len(RESULT_PREFIX):])
    return None


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def run_fresh(args: Sequence[str], caches: CacheDirs, *, use_layername: bool, timeout_s: float,
              env: Mapping[str, str] | None = None) -> FreshRun:
    """Run ``python <args>`` in a new process group on ``caches``; kill the group after ``timeout_s``."""
    workdir = tempfile.mkdtemp(prefix="layerpass-bench-run-")
    out_path, err_path = os.path.join(workdir, "stdout.txt"), os.path.join(workdir, "stderr.txt")
    child = child_env(caches, use_layername=use_layername, extra=env)
    try:
        start = time.perf_counter()
        # output goes to files, not pipes: a chatty child can never block on a full pipe
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, *args], env=child, stdout=out, stderr=err, start_new_session=True)
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        wall = time.perf_counter() - start
        stdout, stderr = _read(out_path), _read(err_path)
        return FreshRun(timed_out=returncode is None, returncode=returncode, wall_s=wall,
                        result=None if returncode is None else _read_result(stdout),
                        stdout_tail=stdout[-TAIL_CHARS:], stderr_tail=stderr[-TAIL_CHARS:])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_cold(args: Sequence[str], *, use_layername: bool, timeout_s: float, what: str) -> tuple[dict[str, Any], float]:
    """``run_fresh`` on new empty caches (removed after); returns (the child's result, wall seconds).

    Raises ``FreshRunError`` naming ``what`` if the child timed out, failed or printed no result."""
    with fresh_cache_dirs() as caches:
        run = run_fresh(args, caches, use_layername=use_layername, timeout_s=timeout_s)
    return run.require(what, timeout_s), run.wall_s
