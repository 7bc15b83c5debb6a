"""The ranks' NCCL settings: graph mixing off by default, the user's own value kept, the
switch that keeps NCCL's default, and a bad switch named."""

from __future__ import annotations

import pytest

from pytest_allreduce.nccl_env import (
    GRAPH_MIXING_SWITCH,
    NCCL_GRAPH_MIXING,
    apply_rank_settings,
    in_effect,
    rank_settings,
)


def test_graph_mixing_is_off_in_the_ranks_by_default() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    assert apply_rank_settings(env) == {NCCL_GRAPH_MIXING: "0"}
    assert env == {"PATH": "/bin", NCCL_GRAPH_MIXING: "0"}
    assert in_effect(env) == {NCCL_GRAPH_MIXING: "0"}


def test_the_users_own_setting_wins() -> None:
    env = {NCCL_GRAPH_MIXING: "1", "NCCL_DEBUG": "WARN"}
    assert apply_rank_settings(env) == {}
    assert env[NCCL_GRAPH_MIXING] == "1"
    assert in_effect(env) == {"NCCL_DEBUG": "WARN", NCCL_GRAPH_MIXING: "1"}


def test_the_switch_keeps_nccls_default() -> None:
    env = {GRAPH_MIXING_SWITCH: "1"}
    assert apply_rank_settings(env) == {}
    assert NCCL_GRAPH_MIXING not in env
    assert in_effect(env) == {NCCL_GRAPH_MIXING: "unset (NCCL default: 1)"}


@pytest.mark.parametrize("value", ["off", "2", "yes"])
def test_a_bad_switch_is_named(value: str) -> None:
    with pytest.raises(ValueError, match=GRAPH_MIXING_SWITCH):
        rank_settings({GRAPH_MIXING_SWITCH: value})
