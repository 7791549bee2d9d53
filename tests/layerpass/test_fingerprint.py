"""``layerpass/fingerprint.py``: the same in every process, different after any edit, and the only
place that reads code or source for a key.

- Processes with different ``PYTHONHASHSEED`` give equal fingerprints of sets, frozensets, dicts
  and nested constants, of code with set literals in nested functions, of closures holding sets,
  and of the piece hash's and the trace deps' view of such functions.
- An edit of a constant, a set member, a nested function or the argument kinds changes the code
  fingerprint; moving a function to other lines does not.
- No other file of the package hashes bytecode or reads a class's source.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from layerpass import fingerprint as fp
from tests.helpers import backend as bh

ROOT = Path(__file__).resolve().parents[2]

SEEDED = r'''
import collections.abc, json
from layerpass import fingerprint as fp
from layerpass.backend.pieces.piece_hash import _Hasher

WORDS = ["alpha", "beta", "gamma", "delta", "eta", "theta", "iota", "kappa"]


def outer(x):
    def inner(y):
        return y in {"alpha", "beta", "gamma", "delta", "eta", "theta"}
    return inner(x) or x in frozenset({("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)})


def make_closure():
    allowed = set(WORDS)
    table = {frozenset(WORDS[:4]): set(WORDS[4:]), "plain": (1, 2.0, None)}

    def check(x):
        return x in allowed and x in table
    return check


values = {
    "set": set(WORDS), "frozenset": frozenset(WORDS), "dict": {w: {w, w + "!"} for w in WORDS},
    "nested": (frozenset(WORDS), [set(WORDS[:3]), {"k": frozenset(WORDS[3:])}]),
    "frozenset keys": {frozenset(WORDS[:4]): 1, frozenset(WORDS[4:]): 2},
    "class dict": dict(collections.abc.MutableMapping.__dict__),  # __abstractmethods__ is a frozenset
}
print(json.dumps({
    "values": {k: fp.value_fingerprint(v) for k, v in values.items()},
    "consts": fp.stable_repr((frozenset(WORDS), (frozenset(WORDS[:5]), "x"))),
    "code": fp.code_fingerprint(outer.__code__),
    "closure": fp.value_fingerprint(make_closure()),
    "piece hash": repr(_Hasher().callable(make_closure())),
    "piece hash outer": repr(_Hasher().callable(outer)),
}, sort_keys=True))
'''


def test_fingerprints_are_equal_under_any_hash_seed() -> None:
    outs = {}
    for seed in ("1", "2", "3"):
        proc = subprocess.run([sys.executable, "-c", SEEDED], capture_output=True, text=True, cwd=bh.TESTS_DIR,
                              env=bh.subprocess_env(PYTHONHASHSEED=seed), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[seed] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outs["1"] == outs["2"] == outs["3"], outs
    # the sets really were iterated in another order by those processes (the test can fail)
    orders = {subprocess.run([sys.executable, "-c", "print(list({'alpha', 'beta', 'gamma', 'delta', 'eta', 'theta'}))"],
                             capture_output=True, text=True, env=bh.subprocess_env(PYTHONHASHSEED=seed)).stdout
              for seed in ("1", "2", "3")}
    assert len(orders) > 1


def _code(source: str, name: str = "f", first_line: int = 1):
    namespace: dict = {}
    exec(compile("\n" * (first_line - 1) + source, "<test>", "exec"), namespace)
    return namespace[name].__code__


BASE = '''
def f(a, b=2):
    def g(y):
        return y in {"alpha", "beta", "gamma"}
    return g(a) and a * 3.0 + b
'''


def test_an_edit_changes_the_code_fingerprint_and_a_move_does_not() -> None:
    base = fp.code_fingerprint(_code(BASE))
    assert fp.code_fingerprint(_code(BASE, first_line=40)) == base  # moved: same code
    edits = {
        "constant": BASE.replace("3.0", "4.0"),
        "constant type": BASE.replace("3.0", "3"),
        "set member": BASE.replace('"gamma"', '"delta"'),
        "nested function's body": BASE.replace("return y in", "return y not in"),
        "argument kind": BASE.replace("def f(a, b=2)", "def f(a, /, b=2)"),
        "a name": BASE.replace("g(a)", "g(b)").replace("def g(y)", "def g(y)"),
        "nested function's name": BASE.replace("def g(y)", "def h(y)").replace("g(a)", "h(a)"),
    }
    fingerprints = {what: fp.code_fingerprint(_code(src)) for what, src in edits.items()}
    assert base not in fingerprints.values(), fingerprints
    assert len(set(fingerprints.values())) == len(edits), fingerprints


def test_file_and_folder_digests_follow_the_file_on_disk(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    f = tmp_path / "pkg" / "m.py"
    f.write_text("X = 1\n")
    before, folder_before = fp.file_digest(str(f)), fp.folders_digest([str(tmp_path / "pkg")])
    assert before == fp.source_digest("X = 1\n")
    f.write_text("X = 2\n")  # same size: the stamp's mtime / ctime tell it apart
    assert fp.file_digest(str(f)) == fp.source_digest("X = 2\n") != before
    assert fp.folders_digest([str(tmp_path / "pkg")]) != folder_before
    assert fp.file_digest(str(tmp_path / "missing.py")) is None


_READS_CODE = re.compile(r"\.co_code\b|co_exceptiontable|getsource\(|getsourcelines\(")


def test_no_other_file_fingerprints_code_or_reads_class_source() -> None:
    """The one owner: reading bytecode or source for a key happens in fingerprint.py only (walking
    ``co_consts`` / ``co_names`` to find code or globals is not keying, and is left to its users)."""
    from tests.layerpass.test_import_graph import module_files, package_dirs

    offenders = []
    for name, path in module_files(package_dirs()).items():
        if name == "layerpass.fingerprint":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _READS_CODE.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
