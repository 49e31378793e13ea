"""The plugin configuration shared by every engine integration: the eviction schedule, the policy and
its parameters, parsed from a dict or a JSON file and validated before any memory is touched."""

import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from .._native import CacheConfig, EvictionConfig, Policy, ScorerCheckpoint
from ..errors import ConfigError, Error

#: Names accepted for ``policy``, mapped to the constructor of ``foresightkv.Policy`` they select.
POLICIES = ("foresight", "full_cache", "streaming_llm", "h2o", "snapkv", "tova", "rkv", "random")

#: Environment variable naming a JSON file with the configuration (engines without a config channel).
CONFIG_ENV = "FORESIGHTKV_CONFIG"

_KEYS = {
    "budget": int,
    "interval": int,
    "policy": str,
    "checkpoint": str,
    "sample": bool,
    "seed": int,
    "temperature": (int, float),
    "sinks": int,
    "kernel": int,
    "lam": (int, float),
    "protect_prompt": bool,
}

#: Options that only some policies read; given to another policy they are refused, not ignored.
_POLICY_OPTIONS = {"sinks": ("streaming_llm",), "kernel": ("snapkv", "rkv"), "lam": ("rkv",)}


@dataclass(frozen=True)
class EngineConfig:
    """Validated plugin configuration: ``budget`` B and ``interval`` L of the live window, the policy
    and its options (same schema for every engine). Every field is checked when the object is built
    (types, NaN/Inf, ranges, options the policy does not read), so a bad value fails here, not when
    the policy is built."""

    budget: int
    interval: int
    policy: str = "foresight"
    checkpoint: Optional[str] = None
    sample: bool = True
    seed: int = 0
    temperature: float = 1.0
    sinks: Optional[int] = None
    kernel: Optional[int] = None
    lam: Optional[float] = None
    protect_prompt: bool = False

    def __post_init__(self) -> None:
        for key, want in _KEYS.items():
            value = getattr(self, key)
            if value is None and EngineConfig.__dataclass_fields__[key].default is None:
                continue
            if isinstance(value, bool) and want is not bool:
                raise ConfigError(f"foresightkv option '{key}' must be {_type_name(want)}, got a boolean")
            if not isinstance(value, want):
                raise ConfigError(f"foresightkv option '{key}' must be {_type_name(want)}, got {value!r}")
        for key in ("temperature", "lam"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"foresightkv option '{key}' must be finite, got {value!r}")
        self.validate(1)

    @staticmethod
    def from_dict(raw: Mapping[str, Any], *, block_size: int = 1) -> "EngineConfig":
        """Parses and validates ``raw`` (unknown keys, wrong types, a schedule the core refuses for
        ``block_size``, a foresight policy without checkpoint: ``ConfigError`` naming the key)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"foresightkv configuration must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_KEYS), key=str)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), list(_KEYS), n=1, cutoff=0.0)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise ConfigError(f"unknown foresightkv option(s) {', '.join(hints)}; known: {sorted(_KEYS)}")
        for key in ("budget", "interval"):
            if key not in raw:
                raise ConfigError(f"foresightkv option '{key}' is required")
        for key, value in raw.items():
            want = _KEYS[key]
            if isinstance(value, bool) and want is not bool:
                raise ConfigError(f"foresightkv option '{key}' must be {_type_name(want)}, got a boolean")
            if not isinstance(value, want):
                raise ConfigError(f"foresightkv option '{key}' must be {_type_name(want)}, got {value!r}")
        cfg = EngineConfig(**{k: (float(v) if k in ("temperature", "lam") else v) for k, v in raw.items()})
        cfg.validate(block_size)
        return cfg

    @staticmethod
    def from_json_file(path: "os.PathLike[str] | str", *, block_size: int = 1) -> "EngineConfig":
        """Reads ``path`` (a JSON object, or ``{"foresightkv": {...}}``) and validates it."""
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read foresightkv configuration {path}: {e}") from e
        except ValueError as e:
            raise ConfigError(f"foresightkv configuration {path} is not valid JSON: {e}") from e
        if isinstance(raw, dict) and set(raw) == {"foresightkv"}:
            raw = raw["foresightkv"]
        return EngineConfig.from_dict(raw, block_size=block_size)

    @staticmethod
    def from_env(*, block_size: int = 1, env: Optional[Mapping[str, str]] = None) -> "EngineConfig":
        """The configuration ``$FORESIGHTKV_CONFIG`` names: the path of a JSON file, or the JSON object
        itself when the value starts with ``{``; ``ConfigError`` when unset."""
        env = os.environ if env is None else env
        value = env.get(CONFIG_ENV, "").strip()
        if not value:
            raise ConfigError(
                f"foresightkv needs its configuration: set {CONFIG_ENV} to a JSON file (or JSON text) such as "
                '{"budget": 1024, "interval": 128, "policy": "foresight", "checkpoint": "/path/to/scorer"}'
            )
        if value.startswith("{"):
            try:
                raw = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"{CONFIG_ENV} is not valid JSON: {e}") from e
            if isinstance(raw, dict) and set(raw) == {"foresightkv"}:
                raw = raw["foresightkv"]
            return EngineConfig.from_dict(raw, block_size=block_size)
        return EngineConfig.from_json_file(value, block_size=block_size)

    def validate(self, block_size: int) -> None:
        """Checks the schedule with the core's rules for ``block_size`` and the policy options."""
        try:
            CacheConfig(
                block_size,
                1,
                eviction=EvictionConfig(self.budget, self.interval, protect_prompt=self.protect_prompt),
            )
        except Error as e:
            raise ConfigError(f"foresightkv schedule (budget {self.budget}, interval {self.interval}): {e}") from e
        except (OverflowError, TypeError) as e:
            raise ConfigError(f"foresightkv schedule (budget {self.budget}, interval {self.interval}): {e}") from e
        if self.policy not in POLICIES:
            raise ConfigError(f"foresightkv policy '{self.policy}' is unknown; choose one of {list(POLICIES)}")
        if self.policy == "foresight" and not self.checkpoint:
            raise ConfigError("foresightkv policy 'foresight' needs 'checkpoint' (a scorer checkpoint directory)")
        if self.policy != "foresight" and self.checkpoint:
            raise ConfigError(
                f"foresightkv option 'checkpoint' only applies to policy 'foresight', not '{self.policy}'"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"foresightkv option 'temperature' must be positive and finite, got {self.temperature}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"foresightkv option 'seed' must be in [0, 2^64), got {self.seed}")
        for key, users in _POLICY_OPTIONS.items():
            if getattr(self, key) is not None and self.policy not in users:
                raise ConfigError(
                    f"foresightkv option '{key}' only applies to policy {' or '.join(map(repr, users))}, "
                    f"not '{self.policy}'"
                )
        if self.sinks is not None and not 0 <= self.sinks < 2**32:
            raise ConfigError(f"foresightkv option 'sinks' must be in [0, 2^32), got {self.sinks}")
        if self.kernel is not None and not (self.kernel % 2 == 1 and 0 < self.kernel <= 65536):
            raise ConfigError(f"foresightkv option 'kernel' must be odd and in [1, 65536], got {self.kernel}")
        if self.lam is not None and not (math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"foresightkv option 'lam' must be in [0, 1], got {self.lam}")

    def to_dict(self) -> Dict[str, Any]:
        """The options that differ from their defaults plus the schedule (round-trips ``from_dict``)."""
        out: Dict[str, Any] = {}
        for key in _KEYS:
            value = getattr(self, key)
            if key in ("budget", "interval") or value != EngineConfig.__dataclass_fields__[key].default:
                out[key] = value
        return out

    def load_checkpoint(self) -> Optional[ScorerCheckpoint]:
        """The scorer checkpoint of the foresight policy (loaded and validated), else None."""
        if self.policy != "foresight":
            return None
        try:
            return ScorerCheckpoint.load(self.checkpoint)
        except Error as e:
            raise ConfigError(f"foresightkv checkpoint {self.checkpoint}: {e}") from e

    def build_policy(self, checkpoint: Optional[ScorerCheckpoint] = None) -> Policy:
        """The ``foresightkv.Policy`` this configuration selects (``checkpoint`` overrides loading)."""
        p = self.policy
        if p == "foresight":
            ck = checkpoint if checkpoint is not None else self.load_checkpoint()
            return Policy.foresight(ck, sample=self.sample, seed=self.seed, temperature=self.temperature)
        if p == "full_cache":
            return Policy.full_cache()
        if p == "streaming_llm":
            return Policy.streaming_llm(self.sinks)
        if p == "h2o":
            return Policy.h2o()
        if p == "snapkv":
            return Policy.snapkv(self.kernel)
        if p == "tova":
            return Policy.tova()
        if p == "rkv":
            return Policy.rkv(self.lam, self.kernel)
        return Policy.random(self.seed)


def _type_name(want: Any) -> str:
    """Human name of an expected type (or tuple of types) in error messages."""
    if isinstance(want, tuple):
        return "a number"
    return {int: "an integer", str: "a string", bool: "a boolean"}[want]
