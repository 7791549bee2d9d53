"""Spawned gloo process groups for the tensor-parallel tests.

``spawn_ranks(worker, out_dir, world)`` starts ``world`` fresh interpreters (``torch.multiprocessing``
spawn), each joining one gloo group over a file store in ``out_dir``; every rank calls
``worker(rank)`` (a module-level function, so that it pickles) with one intra-op thread and saves
what it returns; the call returns those results, indexed by rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run_rank(rank: int, worker: Callable[[int], Any], init_file: str, out_dir: str, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(worker(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Callable[[int], Any], out_dir: str | os.PathLike, world: int) -> list[Any]:
    """Runs ``worker(rank)`` on ranks ``0 .. world - 1`` of a gloo group; their results by rank."""
    out = Path(out_dir)
    mp.spawn(_run_rank, args=(worker, str(out / "init"), str(out), world), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
