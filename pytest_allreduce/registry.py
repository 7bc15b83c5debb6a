"""Which backends exist: the built-in ones, entry points, and conftest/plugin hooks."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from .backend import Backend, iter_variants

ENTRY_POINT_GROUP = "pytest_allreduce.backends"

# One line per built-in backend, "module:class". Modules import without their GPU libraries:
# those are imported by probe() and setup() only.
BUILTIN_BACKENDS: tuple[str, ...] = (
    "pytest_allreduce.backends.gloo:GlooBackend",
    "pytest_allreduce.backends.cpu_shm:CpuShmBackend",
    "pytest_allreduce.backends.nccl:NcclBackend",
    "pytest_allreduce.backends.pynccl:PyncclBackend",
    "pytest_allreduce.backends.torch_symm_mem:TorchSymmMemBackend",
    "pytest_allreduce.backends.custom_ar:CustomArBackend",
    "pytest_allreduce.backends.vllm_custom_ar:VllmCustomArBackend",
    "pytest_allreduce.backends.flashinfer:FlashinferBackend",
    "pytest_allreduce.backends.flashinfer_fusion:FlashinferFusionBackend",
    "pytest_allreduce.backends.mscclpp:MscclppBackend",
    "pytest_allreduce.backends.quick_ar:QuickArBackend",
    "pytest_allreduce.backends.mixed_comm:MixedCommBackend",
)


@dataclass(frozen=True)
class Variant:
    """A selectable backend variant: its class and variant suffix."""

    cls: type[Backend]
    variant: str

    @property
    def name(self) -> str:
        return self.cls.variant_name(self.variant)


class BackendRegistry:
    """Backend classes by name; resolves what users type to concrete variants."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Backend]] = {}

    def register(self, cls: type[Backend]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"{cls!r} is not a pytest_allreduce Backend subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"{cls.__qualname__}.name must be an identifier, got {name!r}")
        known = self._classes.get(name)
        if known is not None and known is not cls:
            raise ValueError(
                f"backend name {name!r} is registered twice: by {known.__module__}."
                f"{known.__qualname__} and {cls.__module__}.{cls.__qualname__}"
            )
        self._classes[name] = cls

    def load_builtins(self) -> None:
        for line in BUILTIN_BACKENDS:
            module, _, attr = line.partition(":")
            self.register(getattr(importlib.import_module(module), attr))

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self.register(ep.load())

    def variants(self) -> list[Variant]:
        return [Variant(cls, v) for cls in self._classes.values() for _, v in iter_variants(cls)]

    def allowed_names(self) -> list[str]:
        """Every name a user may type: backend names and full variant names."""
        names = set(self._classes)
        names.update(v.name for v in self.variants())
        return sorted(names)

    def resolve(self, requested: list[str]) -> list[Variant]:
        """The variants named by `requested` ("all", backend names or variant names).

        Raises ValueError naming each unknown name. Order follows the registry; duplicates
        collapse.
        """
        variants = self.variants()
        if requested == ["all"]:
            return variants
        by_name = {v.name: v for v in variants}
        unknown = [n for n in requested if n not in by_name and n not in self._classes]
        if unknown:
            raise ValueError(f"unknown backend(s): {', '.join(unknown)}")
        wanted = set(requested)
        return [v for v in variants if v.name in wanted or v.cls.name in wanted]
