"""Hooks that conftest files and plugins may implement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .registry import BackendRegistry


@pytest.hookspec
def pytest_allreduce_register_backends(registry: BackendRegistry) -> None:
    """Register extra backends: call ``registry.register(BackendClass)``.

    Called once at start-up, after the built-in and entry-point backends are registered and
    before option values are checked, from plugins and from conftest files that pytest loads
    at start-up (the root conftest and those beside the paths given on the command line).
    """
