"""A free-list allocator of integer ids (KV-cache blocks, recurrent-state slots)."""

from __future__ import annotations


class IdAllocator:
    """Hands out ids ``0 .. total-1``; ``free`` returns them. Lowest ids first (deterministic)."""

    def __init__(self, total: int, what: str) -> None:
        if total <= 0:
            raise ValueError(f"{what} allocator needs a positive total, got {total}")
        self.total, self.what = total, what
        self._free = list(range(total))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} {self.what}s")
        if n > len(self._free):
            raise RuntimeError(
                f"out of {self.what}s: need {n}, {len(self._free)} of {self.total} free; "
                f"release earlier steps (Step.release) or build the model with a larger cache"
            )
        self._free.sort()
        ids, self._free = self._free[:n], self._free[n:]
        return ids

    def free(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.total or i in self._free]
        if bad:
            raise ValueError(f"cannot free {self.what}s {bad}: out of range or already free")
        self._free.extend(ids)
