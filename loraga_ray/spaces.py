"""Search spaces for ``loraga-ray tune``: YAML in, validated, Ray Tune ``param_space`` out.

A space file maps a training option to either a constant or one distribution::

    # rank search: every rank, a log-uniform learning rate for each
    rank: {grid: [4, 8, 16, 32]}         # every value, in every sample (Tune's grid_search)
    lr: {loguniform: [1.0e-5, 1.0e-3]}   # sampled on a log scale, low < high, both > 0
    alpha: {choice: [8, 16, 32]}         # one value drawn per trial
    gamma: {uniform: [4, 64]}            # sampled uniformly, low < high
    direction: ArB2r                     # a constant

Keys are the options of :class:`loraga_ray.options.TrainOptions` that a search may vary (see
:data:`KEYS`). ``grid`` multiplies: Tune runs every grid combination ``--num-samples`` times.
Integer and name keys (rank, batch_size, init, direction, scale, use_rslora) take constants,
``choice`` or ``grid`` only. Every mistake is a :class:`SpaceError` that names the key.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .core.factors import DIRECTIONS, SCALES
from .options import INITS

DISTRIBUTIONS = ("choice", "grid", "loguniform", "uniform")
DISCRETE = ("choice", "grid")

# The folder of the search spaces shipped with the repository (tune_spaces/rank.yaml, ...).
SHIPPED_SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


class SpaceError(ValueError):
    """A search space that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class KeyRule:
    """What one key may hold. ``kind`` is int, float, name or bool; ``low``/``high`` bound the
    values (``low_open``: the lower bound itself is not allowed)."""

    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    names: tuple[str, ...] = ()


KEYS: dict[str, KeyRule] = {
    "rank": KeyRule("int", "LoRA rank r (LoRA-GA uses 2r gradient directions)", low=1),
    "alpha": KeyRule("float", "LoRA alpha", low=0, low_open=True),
    "gamma": KeyRule("float", "gamma of the 'stable' scale", low=0, low_open=True),
    "lr": KeyRule("float", "learning rate", low=0, low_open=True),
    "head_lr": KeyRule("float", "learning rate of a new classifier head", low=0, low_open=True),
    "direction": KeyRule("name", "which singular directions go to A and B", names=DIRECTIONS),
    "scale": KeyRule("name", "scale rule of A0 and B0", names=SCALES),
    "init": KeyRule("name", "adapter initialisation", names=INITS),
    "batch_size": KeyRule("int", "global batch size", low=1),
    "use_rslora": KeyRule("bool", "eta = alpha/sqrt(r) (true) or alpha/r (false)"),
    "weight_decay": KeyRule("float", "AdamW weight decay", low=0),
    "warmup_ratio": KeyRule("float", "fraction of steps of linear warm-up", low=0, high=1, high_open=True),
    "seed": KeyRule("int", "random seed: data order, head and adapter init (a LoRA-GA trial starts from the "
                           "artifact's head, the one its gradient went through)", low=0),
}


@dataclass(frozen=True)
class Param:
    """One key of a space: ``kind`` is const, choice, grid, loguniform or uniform; ``values``
    holds the constant (one value), the listed values, or (low, high)."""

    kind: str
    values: tuple

    def discrete_values(self) -> tuple | None:
        """Every value the key can take, or None for a continuous range."""
        return None if self.kind in ("loguniform", "uniform") else self.values

    def to_tune(self):
        from ray import tune

        if self.kind == "const":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.uniform(*self.values)

    def to_yaml(self):
        if self.kind == "const":
            return self.values[0]
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    source: str = "<space>"

    def param_space(self) -> dict[str, Any]:
        """The ``param_space`` of a ``ray.tune.Tuner``."""
        return {k: p.to_tune() for k, p in self.params.items()}

    def values(self, key: str, default=None) -> tuple:
        """Every value ``key`` can take (``(default,)`` when the space does not set it)."""
        p = self.params.get(key)
        if p is None:
            return (default,)
        vals = p.discrete_values()
        if vals is None:
            raise SpaceError(f"{self.source}: {key!r} is continuous; it has no finite list of values.")
        return vals

    def max_rank(self, default: int) -> int:
        return max(self.values("rank", default))

    def may_use(self, init: str, default_init: str) -> bool:
        """Whether any trial can run with adapter initialisation ``init``."""
        return init in self.values("init", default_init)

    def grid_size(self) -> int:
        """Trials per sample: the product of the grid lengths."""
        return math.prod(len(p.values) for p in self.params.values() if p.kind == "grid")

    def to_dict(self) -> dict:
        """A YAML/JSON-able copy, as it would be written in a space file."""
        return {k: p.to_yaml() for k, p in self.params.items()}



def _fail(source: str, key: str, message: str) -> SpaceError:
    return SpaceError(f"search space {source}: key {key!r}: {message}")


def _check_value(source: str, key: str, rule: KeyRule, value):
    """Validate one value of ``key`` and return it in its canonical type."""
    if rule.kind == "bool":
        if not isinstance(value, bool):
            raise _fail(source, key, f"{value!r} is not true or false.")
        return value
    if rule.kind == "name":
        if not isinstance(value, str) or value not in rule.names:
            hint = difflib.get_close_matches(str(value), rule.names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise _fail(source, key, f"{value!r} is not one of {', '.join(rule.names)}{extra}.")
        return value
    # numbers; YAML 1.1 reads 1e-5 (no dot) as a string, so numeric strings are accepted
    if isinstance(value, str):
        try:
            value = float(value) if rule.kind == "float" else int(value)
        except ValueError:
            raise _fail(source, key, f"{value!r} is not a number.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, key, f"{value!r} is not a number.")
    if rule.kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise _fail(source, key, f"{value!r} is not a whole number.")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise _fail(source, key, f"{value!r} is not a finite number.")
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        raise _fail(source, key, f"{value!r} must be {'>' if rule.low_open else '>='} {rule.low:g} ({rule.help}).")
    if rule.high is not None and (value > rule.high or (rule.high_open and value == rule.high)):
        raise _fail(source, key, f"{value!r} must be {'<' if rule.high_open else '<='} {rule.high:g} ({rule.help}).")
    return value


def _parse_param(source: str, key: str, rule: KeyRule, spec) -> Param:
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise _fail(source, key, f"a bare list {spec!r} is ambiguous; write {{choice: [...]}} or {{grid: [...]}}.")
        return Param("const", (_check_value(source, key, rule, spec),))
    if len(spec) != 1:
        raise _fail(source, key, f"give exactly one of {', '.join(DISTRIBUTIONS)}, got {sorted(map(str, spec))}.")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        hint = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _fail(source, key, f"unknown distribution {kind!r}{extra}; use one of {', '.join(DISTRIBUTIONS)}.")
    if kind in DISCRETE:
        if not isinstance(args, list) or not args:
            raise _fail(source, key, f"{kind} needs a non-empty list of values, got {args!r}.")
        values = tuple(_check_value(source, key, rule, v) for v in args)
        if len(set(values)) != len(values):
            raise _fail(source, key, f"{kind} lists a value twice: {list(args)}.")
        return Param(kind, values)
    # a continuous range
    if rule.kind != "float":
        raise _fail(source, key, f"{kind} draws fractional values but {key} takes {rule.kind} values; use choice or grid.")
    if not isinstance(args, list) or len(args) != 2:
        raise _fail(source, key, f"{kind} needs [low, high], got {args!r}.")
    low, high = (_check_value(source, key, rule, v) for v in args)
    if low >= high:
        raise _fail(source, key, f"{kind} needs low < high, got [{low:g}, {high:g}].")
    if kind == "loguniform" and low <= 0:
        raise _fail(source, key, f"loguniform needs low > 0, got {low:g}.")
    return Param(kind, (low, high))


def parse_space(data, source: str = "<space>") -> SearchSpace:
    """Validate a space given as a mapping (what ``yaml.safe_load`` returns)."""
    if data is None:
        raise SpaceError(f"search space {source} is empty; set at least one key, e.g. rank: {{grid: [4, 8]}}.")
    if not isinstance(data, dict):
        raise SpaceError(f"search space {source} must be a mapping of option -> value or distribution, got {type(data).__name__}.")
    params = {}
    for key, spec in data.items():
        if key not in KEYS:
            hint = difflib.get_close_matches(str(key), KEYS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpaceError(f"search space {source}: unknown key {key!r}{extra}; allowed keys: {', '.join(KEYS)}.")
        params[key] = _parse_param(source, key, KEYS[key], spec)
    if not params:
        raise SpaceError(f"search space {source} is empty; set at least one key, e.g. rank: {{grid: [4, 8]}}.")
    return SearchSpace(params=params, source=source)


def resolve_space_path(path_or_name: str | Path) -> Path:
    """A space file: the path itself, else a file shipped in tune_spaces/ (``rank`` or ``rank.yaml``)."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    shipped = SHIPPED_SPACES / name
    if len(path.parts) <= 1 or str(path).startswith("tune_spaces"):
        if shipped.is_file():
            return shipped
    available = sorted(p.stem for p in SHIPPED_SPACES.glob("*.yaml")) if SHIPPED_SPACES.is_dir() else []
    raise SpaceError(
        f"search space {str(path_or_name)!r} is not a file"
        + (f"; shipped spaces: {', '.join(available)} (in {SHIPPED_SPACES})" if available else "")
        + "."
    )


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Read and validate a YAML space file (see the module docstring for the format)."""
    path = resolve_space_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"search space {path} is not valid YAML: {e}") from None
    return parse_space(data, source=str(path))
