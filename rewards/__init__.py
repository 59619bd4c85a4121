"""Rewards: the protocol, the registry and built-in rewards (DESIGN.md §3).

    from flowalign.rewards import load_reward, call_reward
    reward = load_reward("jpeg_compressibility")      # a name, an entry point or "pkg.mod:Class"
    out = call_reward(reward, images, prompts, metadata, on_error="raise")

Heavier reward families (``shapes``, model-based rewards) are imported on first use.
"""
from flowalign.rewards.base import (
    ENTRY_POINT_GROUP,
    CheckedRewardOutput,
    FunctionReward,
    MultiReward,
    Reward,
    RewardOutput,
    REWARDS,
    as_reward_output,
    available_rewards,
    call_reward,
    call_reward_batched,
    check_reward_inputs,
    check_reward_spec,
    join_details,
    load_reward,
    register_reward,
)
from flowalign.rewards import builtin  # noqa: F401  (registers the weight-free built-ins)
from flowalign.errors import RewardError

__all__ = [
    "ENTRY_POINT_GROUP",
    "CheckedRewardOutput",
    "FunctionReward",
    "MultiReward",
    "Reward",
    "RewardError",
    "RewardOutput",
    "REWARDS",
    "as_reward_output",
    "available_rewards",
    "call_reward",
    "call_reward_batched",
    "check_reward_inputs",
    "check_reward_spec",
    "join_details",
    "load_reward",
    "register_reward",
]
