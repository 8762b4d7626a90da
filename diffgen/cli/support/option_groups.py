"""The options that several commands take together, as typed groups resolved once.

A command declares ``sampler: Sampler`` or ``runtime: Runtime`` among its parameters and is
wrapped by :func:`grouped`: Typer then sees the group's options one by one, in the group's place
(the same flags, help and order as if they were written out), and the command receives them
bundled in one frozen object. The options themselves are :mod:`diffgen.cli.support.options`' aliases.

Only light modules are imported here, so ``--help`` and completion stay fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

from diffgen.cli.support.options import (
    CompileOption,
    ConfidenceOption,
    DeviceOption,
    EntropyBoundOption,
    ExactOption,
    FastOption,
    MaxMemoryOption,
    OffloadOption,
    OfflineOption,
    QuantOption,
    StabilityOption,
    StepsOption,
    TMaxOption,
    TMinOption,
    sampler_flags,
)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """``--steps``, ``--entropy-bound``, ``--t-min``, ``--t-max``, ``--stability``, ``--confidence``
    (``None``: the checkpoint's default)."""

    steps: StepsOption = None
    entropy_bound: EntropyBoundOption = None
    t_min: TMinOption = None
    t_max: TMaxOption = None
    stability: StabilityOption = None
    confidence: ConfidenceOption = None

    def flags(self, **more: Any) -> dict[str, Any]:
        """The generation settings given, by settings field name (``more``: further flags by key,
        e.g. ``max_new_tokens``)."""
        return sampler_flags(**more, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a model loaded here runs: ``--device``, ``--exact`` / ``--fast`` / ``--compile``,
    ``--quant``, ``--max-memory``, ``--offload``, ``--offline``."""

    device: DeviceOption = "auto"
    exact: ExactOption = False
    fast: FastOption = False
    compile: CompileOption = False
    quant: QuantOption = "auto"
    max_memory: MaxMemoryOption = None
    offload: OffloadOption = False
    offline: OfflineOption = False

    def load(self) -> dict[str, Any]:
        """The keywords of :func:`diffgen.loading.prepare.prepare` among these options."""
        return {"offline": self.offline, "device": self.device, "quant": self.quant, "max_memory": self.max_memory,
                "offload": self.offload}


GROUPS = (Sampler, Runtime)


def grouped(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with each parameter annotated by a group of :data:`GROUPS` spread into that
    group's options for Typer, and gathered back into the group when the command is called."""
    signature = inspect.signature(command, eval_str=True)
    parameters: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for parameter in signature.parameters.values():
        group = parameter.annotation
        if group not in GROUPS:
            parameters.append(parameter)
            continue
        hints = typing.get_type_hints(group, include_extras=True)
        fields = dataclasses.fields(group)
        groups[parameter.name] = (group, [field.name for field in fields])
        parameters += [inspect.Parameter(field.name, parameter.kind, default=field.default,
                                         annotation=hints[field.name]) for field in fields]

    @functools.wraps(command)
    def bundled(*args: Any, **kwargs: Any) -> Any:
        for name, (group, names) in groups.items():
            kwargs[name] = group(**{key: kwargs.pop(key) for key in names if key in kwargs})
        return command(*args, **kwargs)

    bundled.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    bundled.__annotations__ = {**{p.name: p.annotation for p in parameters}, "return": signature.return_annotation}
    return bundled
