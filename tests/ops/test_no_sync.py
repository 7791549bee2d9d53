"""A step reads no metadata tensor back to the host (on a GPU each read is a device sync).

The batch metadata's index tensors are made ``Tracked`` tensors: every tensor computed from one is
``Tracked`` too, and every way of reading values back to the host (``item``, ``tolist``, ``bool``,
``int``, ``nonzero``, a boolean mask index, ``.cpu()`` ...) is recorded. The kernels are made to
take the path they take off-CPU (their ``_on_host`` says no: on CPU reading is free, so they
read there). Then ``set_forward_context`` (the per-step registry check) and a step of a zoo
model, eager and compiled, must record no read. Validation and the registry check use the host
values the metadata was built from (``BatchMetadata.host``).
"""

from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch

import layerpass
from layerpass.backend.config import CompilationConfig
from layerpass.models import build_model, make_step
from layerpass.ops import BatchMetadata, set_forward_context
from layerpass.ops import attention as attention_mod
from layerpass.ops import linear_attention as linear_attention_mod
from layerpass.ops import step_inputs as step_inputs_mod
from tests.helpers import backend as bh

_T = torch.Tensor
# reading values back to the host, each a device sync on a GPU (or a data-dependent output size)
READS = {
    _T.item, _T.tolist, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.__complex__, _T.numpy, _T.cpu,
    _T.nonzero, torch.nonzero, _T.argwhere, torch.argwhere, _T.masked_select, torch.masked_select,
    _T.unique, torch.unique, torch.unique_consecutive, _T.unique_consecutive, _T.bincount, torch.bincount,
    _T.repeat_interleave, torch.repeat_interleave, _T.equal, torch.equal, torch.is_nonzero, _T.__contains__,
}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class Tracked(torch.Tensor):
    """A metadata tensor, or one computed from it; records reads back to the host."""

    reads: list[str] = []
    uses = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        Tracked.uses += 1
        name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        if (func in READS or (func in (_T.__getitem__, _T.__setitem__) and _bool_index(args))
                or (func is _T.to and any(a == "cpu" or a == torch.device("cpu") for a in (*args[1:], kwargs.get("device"))))):
            where = "".join(traceback.format_stack(limit=6)[:-1])
            Tracked.reads.append(f"{name}\n{where}")
        return super().__torch_function__(func, types, args, kwargs)


def tracked(md: BatchMetadata) -> BatchMetadata:
    """``md`` with ``Tracked`` tensors and a fresh copy of its host values (which then describe them)."""
    fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}
    for k, v in fields.items():
        if isinstance(v, torch.Tensor):
            fields[k] = v.as_subclass(Tracked)
    fields["host"] = dataclasses.replace(md.host)
    return BatchMetadata(**fields)


@pytest.fixture
def off_host(monkeypatch):
    """The kernels take their off-CPU path (no host reads); reads are recorded from here on."""
    monkeypatch.setattr(attention_mod, "_on_host", lambda t: False)
    monkeypatch.setattr(linear_attention_mod, "_on_host", lambda t: False)
    monkeypatch.setattr(step_inputs_mod, "_on_host", lambda t: False)
    Tracked.reads, Tracked.uses = [], 0
    yield
    Tracked.reads, Tracked.uses = [], 0


def test_the_detector_sees_reads(off_host) -> None:
    md = tracked(make_step(build_model("llama", num_layers=1), num_decodes=1, prefill_lens=[2]).metadata)
    (md.seq_lens + 1).tolist()
    md.seq_lens[md.seq_lens > 2]
    assert [r.split("\n")[0] for r in Tracked.reads] == ["TensorBase.tolist", "TensorBase.__getitem__"], Tracked.reads


MODELS = ["bailing-hybrid", "llama-fp8"]  # linear + softmax attention, MoE; FP8 quant, attention+quant


def _run(name: str, compile_fn) -> None:
    model = build_model(name, num_layers=2)
    step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
    with torch.no_grad():
        ref = step.run(model)
    fn = compile_fn(model)
    if fn is not model:
        with torch.no_grad():
            step.run(fn)  # the first call traces and compiles: not a step
    step.metadata = tracked(step.metadata)  # built and validated from the host values: no read
    assert not Tracked.reads, Tracked.reads[0]
    with torch.no_grad():
        for _ in range(2):
            out = step.run(fn)  # set_forward_context (the registry check) + the step
    assert Tracked.uses > 0, "the step used no metadata tensor: the test proves nothing"
    assert not Tracked.reads, f"{len(Tracked.reads)} reads back to the host, the first:\n{Tracked.reads[0]}"
    bh.assert_matches(out, ref)


@pytest.mark.parametrize("name", MODELS)
def test_eager_step_reads_no_metadata_back(name: str, off_host) -> None:
    _run(name, lambda m: m)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_step_reads_no_metadata_back(name: str, off_host) -> None:
    _run(name, lambda m: torch.compile(m, backend="aot_eager", dynamic=True))


@pytest.mark.slow  # a real compile (regions, passes, Inductor)
@pytest.mark.parametrize("name", MODELS)
def test_layerpass_compiled_step_reads_no_metadata_back(name: str, off_host) -> None:
    _run(name, lambda m: layerpass.compile(m, CompilationConfig(cache_dir=bh.fresh_cache_dir(f"nosync-{name}"))))


def test_forward_context_reads_no_metadata_back(off_host) -> None:
    """The per-step check against the registry's KV and state caches reads the host values; the
    tensors are read again only after they change (a replaced tensor, an in-place write)."""
    model = build_model("bailing-hybrid", num_layers=2)
    md = tracked(make_step(model, num_decodes=1, prefill_lens=[3]).metadata)
    for _ in range(2):
        with set_forward_context(md, model.layer_registry):
            pass
    assert not Tracked.reads, Tracked.reads[0]
    md.block_table.add_(0)  # in place: the host values no longer describe it
    with set_forward_context(md, model.layer_registry):
        pass
    assert Tracked.reads, "an in-place change of the metadata must be read again"


def test_host_values_must_match_the_tensor_shapes() -> None:
    md = make_step(build_model("llama", num_layers=1), num_decodes=1, prefill_lens=[2]).metadata
    bad = dataclasses.replace(md.host, slot_mapping=md.host.slot_mapping[:-1])
    with pytest.raises(ValueError, match=r"host\.slot_mapping has 2 values, the tensor 3"):
        dataclasses.replace(md, host=bad)


def test_host_values_follow_copies_and_changes() -> None:
    """A pickled / deep-copied metadata's host values describe the copy's tensors; ``replace`` with a
    new tensor, or an in-place write, makes them stale: the values are read again (CPU: free)."""
    import copy
    import pickle

    from layerpass.ops import build_batch_metadata, host_values

    md = build_batch_metadata([1, 3], [5, 0], [[0, 1], [2]], 4, state_indices=[0, 1])
    for other in (pickle.loads(pickle.dumps(md)), copy.deepcopy(md)):
        assert host_values(other) is other.host and other.host == md.host
    wide = torch.cat([md.block_table, torch.full((2, 1), 7, dtype=torch.int32)], dim=1)
    replaced = dataclasses.replace(md, block_table=wide)
    assert host_values(replaced).block_table == ((0, 1, 7), (2, 0, 7))
    before = host_values(md)
    md.seq_lens.add_(1)  # in place (the metadata is no longer valid; only the host values are looked at)
    assert host_values(md) is not before and md.host.seq_lens == (7, 4)


@pytest.mark.parametrize("compiled", [False, True])
def test_position_bound_is_checked_on_the_host_metadata(off_host, compiled: bool) -> None:
    """Off the CPU the positions are not read; the bound is checked on the batch's host values
    (a request's last position is ``seq_len - 1``), in eager and inside a compiled program."""
    model = build_model("llama", num_layers=1, max_position=8)
    fn = torch.compile(model, backend="aot_eager", dynamic=True) if compiled else model
    torch.compiler.reset()
    fits = make_step(model, num_decodes=1, prefill_lens=[3], history_lens=[7])  # longest: 8 tokens
    # a batch the model cannot hold (make_step refuses one): built for a longer model
    too_long = make_step(build_model("llama", num_layers=1, max_position=16), num_decodes=1, prefill_lens=[3],
                         history_lens=[8])  # 9 tokens: position 8
    with torch.no_grad():
        ref = fits.run(model)
        fits.metadata, too_long.metadata = tracked(fits.metadata), tracked(too_long.metadata)
        bh.assert_matches(fits.run(fn), ref)
        with pytest.raises(ValueError, match=r"positions must be in \[0, 8\).*longest sequence has 9 tokens"):
            too_long.run(lambda ids, pos: fn(ids, pos))
    assert not Tracked.reads, Tracked.reads[0]
    fits.release()
    too_long.release()
