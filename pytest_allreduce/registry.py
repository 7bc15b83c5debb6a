"""Which backends exist: the built-in ones, entry points, and conftest/plugin hooks."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from .backend import Backend, Limits, VariantSpec
from .model import VariantInfo

ENTRY_POINT_GROUP = "pytest_allreduce.backends"

# One line per built-in backend, "module:class". Modules import without torch or their GPU
# libraries (pytest reads them at start-up): those are imported by probe() and setup() only.
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
    """A selectable backend variant: its class and its one declaration."""

    cls: type[Backend]
    spec: VariantSpec

    @property
    def variant(self) -> str:
        return self.spec.suffix

    @property
    def name(self) -> str:
        return self.cls.variant_name(self.spec.suffix)

    @property
    def server_type(self) -> str | None:
        return self.spec.server_type

    @property
    def fused(self) -> bool:
        return self.spec.fused

    @property
    def simplicity(self) -> int:
        return self.cls.simplicity

    def limits(self, world_size: int) -> Limits:
        return self.cls.limits(self.spec.suffix, world_size)

    @property
    def info(self) -> VariantInfo:
        return VariantInfo(self.name, self.server_type, self.fused, self.simplicity)


class BackendRegistry:
    """Backend classes by name; resolves what users type to concrete variants."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Backend]] = {}

    def register(self, cls: type[Backend], *, replace: bool = False) -> None:
        """Add a backend class. `replace=True` puts it in place of the one registered under
        the same name: a build under test of a backend the server runs (a patched kernel,
        a new library version) is then what the consumer's dispatch picks for that name."""
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"{cls!r} is not a pytest_allreduce Backend subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"{cls.__qualname__}.name must be an identifier, got {name!r}")
        specs = getattr(cls, "variants", None)
        if (
            not isinstance(specs, tuple)
            or not specs
            or not all(isinstance(s, VariantSpec) for s in specs)
        ):
            raise TypeError(
                f"{cls.__qualname__}.variants must be a non-empty tuple of VariantSpec, "
                f"got {specs!r}"
            )
        suffixes = [s.suffix for s in specs]
        if len(set(suffixes)) != len(suffixes):
            raise TypeError(f"{cls.__qualname__}.variants repeats a suffix: {suffixes}")
        known = self._classes.get(name)
        if known is not None and known is not cls and not replace:
            raise ValueError(
                f"backend name {name!r} is registered twice: by {known.__module__}."
                f"{known.__qualname__} and {cls.__module__}.{cls.__qualname__} (pass "
                "replace=True to put a build under test in place of the registered one)"
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
        return [Variant(cls, spec) for cls in self._classes.values() for spec in cls.variants]

    def allowed_names(self) -> list[str]:
        """Every name a user may type: backend names and full variant names."""
        names = set(self._classes)
        names.update(v.name for v in self.variants())
        return sorted(names)

    def variant(self, name: str) -> Variant | None:
        """The variant with this full name, or None."""
        return next((v for v in self.variants() if v.name == name), None)

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
