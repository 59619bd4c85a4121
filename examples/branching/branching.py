"""Tree rollouts with depth-wise subtree advantages, as a plugin: no edit of flowalign.

An example of the rollout and advantage protocols (``sampling.rollout``, an objective's ``advantages`` method) in the
shape BranchGRPO (arXiv 2509.06040) and TreeGRPO give their methods: a prompt's samples share prefixes, and the
transition that split a subtree from its siblings is credited with how that subtree's leaves scored.

Rollout (:func:`tree_rollout`). Each prompt starts ``group_size / width**L`` roots (``L = len(branch_steps)``); just
before each step in ``branch_steps`` every node is copied ``width`` times, and the copies take that step (and the
ones after it) with noise of their own. A leaf is one finished sample; row ``i`` of the trajectory is leaf ``i``'s
whole path, its shared prefix repeated, and ``metadata[i]["tree_path"]`` says which copy it descends from at each
branch step. A branch step should be stochastic (inside the noise window), or its copies stay equal. The shared
prefixes are computed once: with branch steps 0, 1, 2 of 10, width 2 and 8 leaves, the transformer runs
2 + 4 + 8·8 = 70 rows per root instead of 80 (the root's copies take step 0).

Advantages (:func:`subtree_advantages`, :class:`TreeGRPO`). A node's value is the mean reward of the leaves below
it. At depth ``d`` (after ``d`` branch steps) the group's nodes are normalised together, ``(v - mean_d) / (std_d +
eps)`` over the distinct nodes (not over their repeated leaves), and each step's transition gets the value of the node
that took it: step ``k`` is taken by the depth ``d(k) = #{b in branch_steps: b <= k}`` ancestor of each leaf. A step
every leaf of a group shares (before the first branch, one root per prompt) gets 0 and is not trained. Departures
from the papers, on purpose for a short example: node values are plain means (BranchGRPO fuses them with a softmax
over path log-probs; TreeGRPO weighs its backup by the old policy's edge probabilities), and a shared transition is
trained once per leaf below it (with its node's advantage), not once per edge.

Run it on the toy (from the repository root)::

    PYTHONPATH=examples/branching flowalign train --config examples/branching/toy_tree_grpo.yaml
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign import sde
from flowalign.objectives.grpo import FlowGRPO
from flowalign.sampling import integrate, noise_levels
from flowalign.trajectory import Trajectory


def tree_rollout(adapter, prompts: Sequence[str], *, group_size: int, num_steps: int, kernel: str, schedule=None,
                 guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None, log_prob_reduce: str = "mean",
                 log_prob_form: str = "gaussian", iteration: int = 0, metadata: Optional[Sequence[dict]] = None,
                 micro_batch_size: Optional[int] = None, cond=None, on_step=None, record_x0: bool = False, decode: bool = True,
                 initial_noise: Optional[Tensor] = None, branch_steps: Sequence[int] = (0,), width: int = 2,
                 **engine_options) -> Trajectory:
    """``group_size`` leaves per prompt of a tree that branches ``width`` ways before each step of ``branch_steps``
    (module docstring), with :func:`flowalign.sampling.rollout`'s signature and layout. Settings it does not honour
    (``share_initial_noise``, ``drift``) reach it only through ``engine_options``, so a recipe that sets them is
    refused at load."""
    branch_steps = sorted(int(b) for b in branch_steps)
    levels_count = len(branch_steps)
    if width < 2 or len(set(branch_steps)) != levels_count or not all(0 <= b < num_steps for b in branch_steps):
        raise ValueError(f"tree_rollout: width must be >= 2 and branch_steps distinct steps in [0, {num_steps}), got "
                         f"width={width}, branch_steps={list(branch_steps)}")
    if group_size % width**levels_count:
        raise ValueError(f"tree_rollout: group_size {group_size} is not a multiple of width**len(branch_steps) = {width**levels_count}")
    if record_x0 or initial_noise is not None:
        raise ValueError("tree_rollout records no x0-predictions and draws its own roots")
    num_prompts, roots = len(prompts), group_size // width**levels_count
    sigmas = adapter.sigmas(num_steps).to(torch.float32).cpu()
    levels = noise_levels(schedule, num_steps, iteration, generator)
    if cond is None:
        cond = adapter.encode(list(prompts), do_classifier_free_guidance=guidance_scale > 1.0)
    x = adapter.initial_noise(num_prompts * roots, generator)
    node_cond = cond.repeat_interleave(roots) if roots > 1 else cond
    options = dict(kernel=kernel, guidance_scale=guidance_scale, generator=generator, log_prob_reduce=log_prob_reduce,
                   log_prob_form=log_prob_form, record_x0=False, micro_batch_size=micro_batch_size, on_step=on_step)
    # segments between branch points: [0, b0), [b0, b1), ..., [bL-1, K); copies are made at the start of each but the first
    bounds = [0, *[b for b in branch_steps if b > 0], num_steps]
    segments, nfe, copies = [], 0, 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start in branch_steps:
            x, node_cond, copies = x.repeat_interleave(width, dim=0), node_cond.repeat_interleave(width), copies + 1
        run = integrate(adapter, x, node_cond, sigmas[start:end + 1], levels=levels[start:end], **options)
        segments.append((run, copies))
        x, nfe = run.final, nfe + run.nfe
    # every segment's records, repeated out to the leaves below each node
    leaves = num_prompts * group_size
    expand = [width ** (levels_count - made) for _, made in segments]
    latents = torch.cat([segments[0][0].latents[:, :1].repeat_interleave(expand[0], dim=0)]
                        + [run.latents[:, 1:].repeat_interleave(n, dim=0) for (run, _), n in zip(segments, expand)], dim=1)
    log_probs = torch.cat([run.log_probs.repeat_interleave(n, dim=0) for (run, _), n in zip(segments, expand)], dim=1)
    stds = torch.cat([run.stds.repeat_interleave(n, dim=0) for (run, _), n in zip(segments, expand)], dim=1)
    per_prompt = list(metadata) if metadata is not None else [{}] * num_prompts
    sample_metadata = []
    for i in range(leaves):
        leaf = i % group_size
        path = [(leaf // width ** (levels_count - 1 - d)) % width for d in range(levels_count)]
        sample_metadata.append({**dict(per_prompt[i // group_size]), "tree_path": path, "tree_root": leaf // width**levels_count})
    images = adapter.decode(x) if decode else None
    return Trajectory(
        prompts=[p for p in prompts for _ in range(group_size)], group_ids=torch.arange(num_prompts).repeat_interleave(group_size),
        sigmas=sigmas, latents=latents, log_probs=log_probs, stds=stds, noise_levels=levels,
        stochastic_mask=sde.is_stochastic(kernel, sigmas[:-1], sigmas[1:], levels), images=images, kernel=kernel,
        guidance_scale=float(guidance_scale), metadata=sample_metadata, nfe=nfe, log_prob_reduce=log_prob_reduce,
        log_prob_form=log_prob_form)


def step_depths(branch_steps: Sequence[int], num_steps: int) -> Tensor:
    """``[K]`` long: the depth of the node that takes each step, the number of branch steps at or before it."""
    branch = torch.as_tensor(sorted(branch_steps), dtype=torch.long)
    return (branch[None, :] <= torch.arange(num_steps)[:, None]).sum(dim=1)


def subtree_advantages(rewards: Tensor, group_ids: Tensor, paths: Tensor, depths: Tensor, eps: float = 1e-4) -> Tensor:
    """Depth-wise normalised subtree values ``[B, K]`` (module docstring).

    Args:
        rewards: ``[B]`` leaf rewards.
        group_ids: ``[B]`` the prompt group of each leaf.
        paths: ``[B, L]`` which copy each leaf descends from at each branch step, and the root it grew from in front
            (``[B, 1 + L]``: root, then the path), so that two leaves share their depth-``d`` node when the first
            ``1 + d`` entries agree.
        depths: ``[K]`` the node depth that takes each step (:func:`step_depths`).
    """
    rewards = rewards.double()
    out = torch.zeros(rewards.shape[0], depths.shape[0], dtype=torch.float64)
    for d in depths.unique().tolist():
        value = torch.zeros_like(rewards)
        for g in group_ids.unique():
            rows = torch.nonzero(group_ids == g).flatten()
            keys = [tuple(paths[i, :1 + d].tolist()) for i in rows.tolist()]
            nodes = sorted(set(keys))
            node_value = torch.stack([rewards[rows[[k == n for k in keys]]].mean() for n in nodes])
            centred = node_value - node_value.mean()
            normed = centred / (node_value.std(unbiased=True) + eps) if len(nodes) > 1 else torch.zeros_like(centred)
            value[rows] = normed[[nodes.index(k) for k in keys]]
        out[:, depths == d] = value[:, None]
    return out.float()


def first_leaf_of_each_node(paths: Tensor, group_ids: Tensor, depths: Tensor) -> Tensor:
    """``[B, K]`` bool: True where a row is the first leaf (in row order) of the node that takes that step, so that
    masking the others trains each shared transition once (``paths`` as in :func:`subtree_advantages`)."""
    out = torch.zeros(paths.shape[0], depths.shape[0], dtype=torch.bool)
    for d in depths.unique().tolist():
        seen = set()
        first = torch.zeros(paths.shape[0], dtype=torch.bool)
        for i in range(paths.shape[0]):
            key = (int(group_ids[i]), *paths[i, :1 + d].tolist())
            first[i] = key not in seen
            seen.add(key)
        out[:, depths == d] = first[:, None]
    return out


class TreeGRPO(FlowGRPO):
    """Flow-GRPO's clipped loss on per-step advantages from :func:`subtree_advantages` (a ``tree_rollout`` run):
    ``objective: {name: "branching:TreeGRPO", kwargs: {branch_steps: [0, 1, 2]}}`` with the rollout's own
    ``branch_steps``. ``adv_eps`` is the normalisation's epsilon; ``objective.adv_clip`` still clamps in the loss.
    ``edges``: ``"per_leaf"`` trains a shared transition once per leaf below it (its rows repeat it); ``"once"`` keeps
    the advantage on the node's first leaf only (:func:`first_leaf_of_each_node`), as TreeGRPO trains each edge once."""

    def __init__(self, branch_steps: Sequence[int] = (0,), adv_eps: float = 1e-4, edges: str = "per_leaf", **grpo_kwargs):
        super().__init__(**grpo_kwargs)
        if edges not in ("per_leaf", "once"):
            raise ValueError(f"edges must be 'per_leaf' or 'once', got {edges!r}")
        self.branch_steps, self.adv_eps, self.edges = list(branch_steps), adv_eps, edges

    def advantages(self, rewards: Tensor, group_ids: Tensor, keep: Tensor, traj: Trajectory, components=None) -> Tensor:
        """``[B, K]``: each leaf's path's nodes, normalised per depth over the group (dropped leaves count as their
        group's mean, so they neither raise nor lower a node)."""
        if any(len(m.get("tree_path", ())) != len(self.branch_steps) for m in traj.metadata):
            raise ValueError(f"TreeGRPO(branch_steps={self.branch_steps}) needs tree_rollout's tree_path of as many steps in each "
                             "sample's metadata: set sampling.rollout_kwargs.branch_steps to the same list")
        filled = rewards.clone().float()
        for g in group_ids.unique():
            rows = group_ids == g
            kept = rows & keep
            filled[rows & ~keep] = filled[kept].mean() if bool(kept.any()) else 0.0
        paths = torch.tensor([[m["tree_root"], *m["tree_path"]] for m in traj.metadata], dtype=torch.long)
        depths = step_depths(self.branch_steps, traj.num_steps)
        adv = subtree_advantages(filled, group_ids, paths, depths, self.adv_eps)
        if self.edges == "once":
            adv = adv * first_leaf_of_each_node(paths, group_ids, depths)
        return adv
