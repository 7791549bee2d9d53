"""What a ``layerpass bench`` sweep measures and how: ``SweepConfig``, its checks and time limits.

There is no sweep budget: a slow machine gives the same complete table, later. Each measurement
process gets its own limit, scaled to its size and generous enough that only a hung process
reaches it (``timeout_for``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .measure import MODES
from .presets import PRESET_NAMES, PRESETS, Unit, preset_axes, preset_units

DEFAULT_JOBS = 1  # measurements at once: one, so they never compete for the cores
# Per-measurement time limit: generous and scaled to size, so only a hung process reaches it.
# (On the reference 2-core machine the slowest default row, inductor at 80 layers, needs about
# 2 minutes; the limit there is 1900 s.)
TIMEOUT_BASE_S = 300.0
TIMEOUT_PER_LAYER_S = 20.0


def timeout_for(layers: int, scale: float = 1.0) -> float:
    """The default time limit of one measurement process: ``scale * (300 + 20 * layers)`` seconds."""
    return scale * (TIMEOUT_BASE_S + TIMEOUT_PER_LAYER_S * layers)


@dataclass
class SweepConfig:
    """What to sweep and how.

    Rows: ``units`` if given; else, if any of ``models``/``layers``/``modes`` is given, their product
    (the missing ones taken from the preset); else the ``preset``'s rows. After construction
    ``units`` holds the resolved rows and ``models``/``layers``/``modes`` the values they use."""

    models: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    modes: tuple[str, ...] | None = None
    preset: str = "default"
    units: tuple[Unit, ...] | None = None
    out_dir: str = "bench-results"
    timeout_s: float | None = None  # fixed limit per process (cold or warm); None: timeout_for(layers)
    timeout_scale: float = 1.0  # multiplies the scaled default limit
    repeats: int = 20
    threads: int = 1
    jobs: int = DEFAULT_JOBS  # measurements at once (never two of one model+mode)
    rel_tolerance: float = 0.05  # max_abs_err allowed, relative to max(1, max |eager logits|)
    imports: tuple[str, ...] = ()
    keep_cache: bool = False
    command: str = ""  # the command line that started the sweep (recorded, shown under the table)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESET_NAMES)}")
        for name in ("models", "layers", "modes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        self._check_axes()
        if self.units is None:
            self.units = self._units_from_axes()
        self.units = tuple((str(m), int(n), str(mode)) for m, n, mode in self.units)
        if not self.units:
            raise ValueError("nothing to measure")
        bad = [u for u in self.units if u[2] not in MODES or u[1] < 1]
        if bad:
            raise ValueError(f"bad rows {bad}: modes must be one of {', '.join(MODES)}, layer counts >= 1")
        self.models = tuple(dict.fromkeys(u[0] for u in self.units))
        self.layers = tuple(sorted({u[1] for u in self.units}))
        used = dict.fromkeys(u[2] for u in self.units)  # the order given, else the canonical order of MODES
        self.modes = tuple(m for m in (self.modes or MODES) if m in used) + tuple(m for m in used if m not in MODES)
        self._check_limits()

    def _check_axes(self) -> None:
        if self.modes is not None:
            bad_modes = [m for m in self.modes if m not in MODES]
            if bad_modes or not self.modes:
                raise ValueError(f"unknown or no modes {bad_modes or list(self.modes)}; allowed: {', '.join(MODES)}")
        if self.layers is not None and (not self.layers or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.layers)):
            raise ValueError(f"layer counts must be positive ints, got {list(self.layers)}")
        if self.models is not None and not self.models:
            raise ValueError("no models given")

    def _units_from_axes(self) -> tuple[Unit, ...]:
        if self.models is None and self.layers is None and self.modes is None:
            return preset_units(self.preset)
        models, layers, modes = preset_axes(self.preset)
        models, modes = self.models or models, self.modes or modes
        return tuple((m, n, mode) for n in sorted(set(self.layers or layers))
                     for m in dict.fromkeys(models) for mode in dict.fromkeys(modes))

    def _check_limits(self) -> None:
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.timeout_scale <= 0:
            raise ValueError(f"timeout scale must be > 0, got {self.timeout_scale}")
        if self.repeats < 1 or self.threads < 1 or self.jobs < 1:
            raise ValueError(f"repeats, threads and jobs must be >= 1, got {self.repeats}, {self.threads}, {self.jobs}")

    @property
    def sweep_name(self) -> str:
        """The preset's name if the rows are exactly the preset's, else ``custom``."""
        return self.preset if self.units == preset_units(self.preset) else "custom"

    def timeout(self, layers: int) -> float:
        """The time limit of one measurement process (cold or warm) at ``layers``."""
        return self.timeout_s if self.timeout_s is not None else timeout_for(layers, self.timeout_scale)


def config_record(cfg: SweepConfig) -> dict[str, Any]:
    """The configuration as recorded in results.json (``units`` as lists, the limits per layer count)."""
    config = asdict(cfg)
    config.pop("extra_env")
    config["units"] = [list(u) for u in cfg.units]
    config["sweep"] = cfg.sweep_name
    config["timeouts_s"] = {str(n): cfg.timeout(n) for n in cfg.layers}
    return config


def check_models(models: Sequence[str], imports: Sequence[str] = ()) -> None:
    """Fail early, naming the registered models, if a requested one is not in the zoo (or is an
    ``hf-config:PATH`` whose path does not exist).

    ``imports`` are imported first: they may register more models."""
    from layerpass.models.registry import model_entry, model_prefixes, registered_models

    for name in imports:
        importlib.import_module(name)
    unknown, bad = [], []
    for m in models:
        try:
            model_entry(m)
        except KeyError:
            unknown.append(m)
        except ValueError as e:
            bad.append(str(e))
    if unknown:
        prefixes = f" (or a name starting with {', '.join(model_prefixes())})" if model_prefixes() else ""
        raise ValueError(f"unknown model(s) {unknown}; registered models: {', '.join(registered_models())}{prefixes}")
    if bad:
        raise ValueError("; ".join(bad))