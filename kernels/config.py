"""Typed kernel configurations: a frozen dataclass per kernel, its fields the kernel's tuning
parameters, checked when it is built (a ValueError naming the field), hashable so a configuration
is part of a call's static plan.

An implementation's configuration is a `Kernels`: a frozen dataclass whose fields are its kernels'
configurations (attention's forward, dkdv, dq; LN+FFN's ln, up, down, ...). Flattened, each
parameter is named "<kernel>_<field>" ("dkdv_block_q": the dK/dV kernel's query tile; the
forward kernel's fields, or a lone kernel's, go unprefixed): the names of the tuning table
(kernels/tuning.json), of bench/tune.py's candidates, of the `block_sizes` overrides and of the
benchmarks' flags, all read from these dataclasses.

    @dataclasses.dataclass(frozen=True)
    class Gemm(KernelConfig):
        block_m: int = tile(multiple_of=64)
        num_stages: int = stages(minimum=2)
"""
from __future__ import annotations

import dataclasses
import typing


def tile(*, multiple_of: int = 1, power_of_two: bool = False, minimum: int = 1):
    """A block size: an int >= minimum, a multiple of multiple_of, a power of two if asked."""
    return dataclasses.field(metadata=dict(kind="int", minimum=max(minimum, multiple_of),
                                           multiple_of=multiple_of, power_of_two=power_of_two))


def count(*, minimum: int = 1):
    """A count (warps, stages, MiB): an int >= minimum."""
    return dataclasses.field(metadata=dict(kind="int", minimum=minimum, multiple_of=1,
                                           power_of_two=False))


def stages(*, minimum: int = 1):
    """Pipeline depth: an int >= minimum."""
    return count(minimum=minimum)


def flag():
    """A switch: a bool (the tuning table's JSON may hold it as 0 or 1)."""
    return dataclasses.field(metadata=dict(kind="bool"))


def _problem(value, rule: dict) -> str | None:
    """What is wrong with value under the field's rule, or None."""
    if rule["kind"] == "bool":
        return None if isinstance(value, bool) else "must be a bool"
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be an int"
    if value < rule["minimum"]:
        return f"must be >= {rule['minimum']}"
    if value % rule["multiple_of"]:
        return f"must be a multiple of {rule['multiple_of']}"
    if rule["power_of_two"] and value & (value - 1):
        return "must be a power of two"
    return None


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One kernel's parameters; subclasses declare them with tile(), count(), stages(), flag()."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if "kind" not in field.metadata:
                raise TypeError(f"{type(self).__name__}.{field.name}: declare it with tile(), "
                                f"count(), stages() or flag()")
            value = getattr(self, field.name)
            if field.metadata["kind"] == "bool" and value in (0, 1):
                object.__setattr__(self, field.name, value := bool(value))
            problem = _problem(value, field.metadata)
            if problem:
                raise ValueError(f"{field.name}={value!r} {problem}")


def _kernel_classes(cls) -> dict[str, type[KernelConfig]]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def prefix(kernel: str) -> str:
    """The flat names' prefix of a kernel's fields: none for the forward (or lone) kernel's."""
    return "" if kernel == "forward" else f"{kernel}_"


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The configurations of an implementation's kernels, a field each (subclasses declare them,
    typed with their KernelConfig classes)."""

    @classmethod
    def names(cls, kernels: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The flat parameter names (of the given kernels, default all), in declaration order."""
        return tuple(prefix(kernel) + field.name
                     for kernel, config_class in _kernel_classes(cls).items()
                     if kernels is None or kernel in kernels
                     for field in dataclasses.fields(config_class))

    @classmethod
    def from_flat(cls, values: dict, label: str):
        """Built from flat names -> values (every name present; others raise), a ValueError
        naming `label` and the flat name where a value is wrong."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(f"{label} has no tuning parameter {unknown[0]!r}; known: "
                             f"{sorted(cls.names())}")
        kernels = {}
        for kernel, config_class in _kernel_classes(cls).items():
            fields = {field.name: values[prefix(kernel) + field.name]
                      for field in dataclasses.fields(config_class)}
            try:
                kernels[kernel] = config_class(**fields)
            except ValueError as err:
                raise ValueError(f"{label}: {prefix(kernel)}{err}") from None
        return cls(**kernels)

    def flat(self) -> dict:
        """Flat names -> values (bools as they are)."""
        return {prefix(kernel) + name: value
                for kernel in _kernel_classes(type(self))
                for name, value in dataclasses.asdict(getattr(self, kernel)).items()}

    def replace(self, **kernels: dict):
        """A copy with some kernels' fields replaced: replace(up={"block_m": 64})."""
        return dataclasses.replace(self, **{
            kernel: dataclasses.replace(getattr(self, kernel), **fields)
            for kernel, fields in kernels.items()})
