"""Tree rollouts with depth-wise subtree advantages, as a plugin: no edit of flowalign.

An example of the rollout and advantage protocols (``sampling.rollout``, an objective's ``advantages`` method) in the
shape BranchGRPO (arXiv 2509.06040) and TreeGRPO give their methods: a prompt's samples share prefixes, and the
transition that split a subtree from its siblings is credited with how that subtree's leaves scored.

Rollout (:func:`tree_rollout`). Each prompt starts ``group_size / width**L`` roots (``L = len(branch_steps)``); just
before each step in ``branch_steps`` every node is copied ``width`` times, and the copies take that step (and the
ones after it) with noise of their own. A leaf is one finished sample; row ``i`` of the trajectory is leaf ``i``'s
whole path, its shared prefix repeated, and ``metadata[i]["tree_path"]`` says which copy it descends from at each
branch step. A branch step must be stochastic (inside the noise window), or its copies would stay equal: the recipe
check (:func:`validate`, which ``sampling.rollout`` calls at load) refuses it, with the tree's shape, at every iteration of
a moving (sliding or random) window, and the rollout checks each iteration's levels again. The shared
prefixes are computed once: with branch steps 0, 1, 2 of 10, width 2 and 8 leaves, the transformer runs
2 + 4 + 8·8 = 70 rows per root instead of 80 (the root's copies take step 0).

Advantages (:func:`subtree_advantages`, :class:`TreeGRPO`, which reads the branch steps from each sample's
``metadata["tree_branch_steps"]``, so the recipe states them once). A node's value is the mean reward of the kept
leaves below it (a dropped reward neither raises nor lowers it). At depth ``d`` (after ``d`` branch steps) the group's
nodes are normalised together, ``(v - mean_d) / (std_d + eps)`` over the distinct nodes (not over their repeated
leaves), and each step's transition gets the value of the node that took it: step ``k`` is taken by the depth
``d(k) = #{b in branch_steps: b <= k}`` ancestor of each leaf. A step every leaf of a group shares (before the first
branch, one root per prompt) gets 0 and is not trained. Departures from the papers, on purpose for a short example:
node values are plain means (BranchGRPO fuses them with a softmax over path log-probs; TreeGRPO weighs its backup
by the old policy's edge probabilities), and by default a shared transition is trained once per leaf below it (with
its node's advantage); ``TreeGRPO(edges="once")`` trains it once.

Run it on the toy (from the repository root)::

    PYTHONPATH=examples/branching flowalign train --config examples/branching/toy_tree_grpo.yaml
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign import sde
from flowalign.errors import ConfigError
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
    branch_steps = check_tree(branch_steps, width, group_size, num_steps)
    levels_count = len(branch_steps)
    if record_x0 or initial_noise is not None:
        raise ConfigError("tree_rollout records no x0-predictions and draws its own roots")
    num_prompts, roots = len(prompts), group_size // width**levels_count
    sigmas = adapter.sigmas(num_steps).to(torch.float32).cpu()
    levels = noise_levels(schedule, num_steps, iteration, generator)
    stochastic = sde.is_stochastic(kernel, sigmas[:-1], sigmas[1:], levels)
    quiet = [b for b in branch_steps if not bool(stochastic[b])]
    if quiet:  # validate() looked at the schedule at load; a schedule of one's own can still move its noise
        raise ConfigError(f"tree: branch steps {quiet} draw no noise at iteration {iteration} (levels {[round(float(v), 4) for v in levels]}): "
                          "their copies would stay equal")
    if cond is None:
        cond = adapter.encode(list(prompts), do_classifier_free_guidance=guidance_scale > 1.0)
    x = adapter.initial_noise(num_prompts * roots, generator)
    node_cond = cond.repeat_interleave(roots) if roots > 1 else cond
    options = dict(kernel=kernel, guidance_scale=guidance_scale, generator=generator, log_prob_reduce=log_prob_reduce,
                   log_prob_form=log_prob_form, record_x0=False, micro_batch_size=micro_batch_size)
    # segments between branch points: [0, b0), [b0, b1), ..., [bL-1, K); copies are made at the start of each but the first
    bounds = [0, *[b for b in branch_steps if b > 0], num_steps]
    segments, nfe, copies = [], 0, 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start in branch_steps:
            x, node_cond, copies = x.repeat_interleave(width, dim=0), node_cond.repeat_interleave(width), copies + 1
        step_done = None if on_step is None else (lambda k, first=start: on_step(first + k))  # the rollout's step index
        run = integrate(adapter, x, node_cond, sigmas[start:end + 1], levels=levels[start:end], on_step=step_done, **options)
        segments.append((run, copies))
        x, nfe = run.final, nfe + run.nfe
    # every segment's records, repeated out to the leaves below each node
    leaves = num_prompts * group_size
    expand = [width ** (levels_count - made) for _, made in segments]

    def to_leaves(records: str, first: int = 0) -> list[Tensor]:  # each segment's [nodes, steps, ...] records, per leaf
        return [getattr(run, records)[:, first:].repeat_interleave(n, dim=0) for (run, _), n in zip(segments, expand)]

    x_start = segments[0][0].latents[:, :1].repeat_interleave(expand[0], dim=0)
    latents = torch.cat([x_start, *to_leaves("latents", first=1)], dim=1)  # each segment's first latent ends the one before
    log_probs, stds = torch.cat(to_leaves("log_probs"), dim=1), torch.cat(to_leaves("stds"), dim=1)
    per_prompt = list(metadata) if metadata is not None else [{}] * num_prompts
    sample_metadata = []
    for i in range(leaves):
        leaf = i % group_size
        path = [(leaf // width ** (levels_count - 1 - d)) % width for d in range(levels_count)]
        sample_metadata.append({**dict(per_prompt[i // group_size]), "tree_path": path, "tree_root": leaf // width**levels_count,
                                "tree_branch_steps": list(branch_steps)})
    images = adapter.decode(x) if decode else None
    return Trajectory(
        prompts=[p for p in prompts for _ in range(group_size)], group_ids=torch.arange(num_prompts).repeat_interleave(group_size),
        sigmas=sigmas, latents=latents, log_probs=log_probs, stds=stds, noise_levels=levels,
        stochastic_mask=stochastic, images=images, kernel=kernel,
        guidance_scale=float(guidance_scale), metadata=sample_metadata, nfe=nfe, log_prob_reduce=log_prob_reduce,
        log_prob_form=log_prob_form)


def check_tree(branch_steps: Sequence[int], width: int, group_size: int, num_steps: int) -> list[int]:
    """``branch_steps`` sorted, or a ConfigError: distinct steps in ``[0, num_steps)``, ``width >= 2``, and
    ``group_size`` a multiple of ``width ** len(branch_steps)`` (the leaves of whole trees)."""
    try:
        steps = sorted(int(b) for b in branch_steps)
    except (TypeError, ValueError):
        raise ConfigError(f"tree: branch_steps must be a list of step indices, got {branch_steps!r}") from None
    if not isinstance(width, int) or width < 2:
        raise ConfigError(f"tree: width must be an int >= 2, got {width!r}")
    if len(set(steps)) != len(steps) or not all(0 <= b < num_steps for b in steps):
        raise ConfigError(f"tree: branch_steps must be distinct steps in [0, {num_steps}), got {list(branch_steps)}")
    if group_size % width ** len(steps):
        raise ConfigError(f"tree: group_size {group_size} is not a multiple of width**len(branch_steps) = {width ** len(steps)}")
    return steps


#: iterations (and random-window seeds) :func:`validate` looks at: a sliding window cycles through its positions well
#: within them unless it moves slower than every 100 iterations, and 1024 seeds draw every start of a random one
VALIDATED_ITERATIONS = 1024


def validate(sampling_config) -> None:
    """Checks at load (``sampling.rollout`` calls a rollout's ``validate(sampling_config)`` when it has one): the tree's
    shape (:func:`check_tree`), and that every branch step is stochastic at every iteration (a deterministic step would
    copy a node into equal children, wasting their compute and giving their subtrees one value). A schedule that moves
    (a sliding or random window) is checked over its first :data:`VALIDATED_ITERATIONS` iterations, a random one with
    as many seeds; :func:`tree_rollout` checks each iteration's levels again."""
    s = sampling_config
    kwargs = dict(s.rollout_kwargs)
    steps = check_tree(kwargs.get("branch_steps", (0,)), kwargs.get("width", 2), s.group_size, s.num_steps)
    for iteration in range(VALIDATED_ITERATIONS):
        _, noisy = s.noise_at(iteration, seed=iteration)
        quiet = [b for b in steps if not bool(noisy[b])]
        if quiet:
            when = "" if iteration == 0 else f" at iteration {iteration} (the window moves; branch on steps every window covers, or fix it)"
            raise ConfigError(f"tree: branch steps {quiet} draw no noise under sampling.noise_schedule={s.noise_schedule!r} "
                              f"{s.noise_kwargs}{when}: their copies would stay equal; branch on the noisy steps "
                              f"{torch.nonzero(noisy).flatten().tolist()}")


tree_rollout.validate = validate


def step_depths(branch_steps: Sequence[int], num_steps: int) -> Tensor:
    """``[K]`` long: the depth of the node that takes each step, the number of branch steps at or before it."""
    branch = torch.as_tensor(sorted(branch_steps), dtype=torch.long)
    return (branch[None, :] <= torch.arange(num_steps)[:, None]).sum(dim=1)


def subtree_advantages(rewards: Tensor, group_ids: Tensor, paths: Tensor, depths: Tensor, eps: float = 1e-4,
                       keep: Optional[Tensor] = None) -> Tensor:
    """Depth-wise normalised subtree values ``[B, K]`` (module docstring).

    Args:
        rewards: ``[B]`` leaf rewards.
        group_ids: ``[B]`` the prompt group of each leaf.
        paths: ``[B, L]`` which copy each leaf descends from at each branch step, and the root it grew from in front
            (``[B, 1 + L]``: root, then the path), so that two leaves share their depth-``d`` node when the first
            ``1 + d`` entries agree.
        depths: ``[K]`` the node depth that takes each step (:func:`step_depths`).
        keep: ``[B]`` bool, the leaves whose reward counts (default: all). A node's value is the mean of its kept
            leaves; a node without one takes no part in its depth's normalisation and gets 0.
    """
    rewards = rewards.double()
    keep = torch.ones_like(rewards, dtype=torch.bool) if keep is None else keep.bool()
    out = torch.zeros(rewards.shape[0], depths.shape[0], dtype=torch.float64)
    for d in depths.unique().tolist():
        value = torch.zeros_like(rewards)
        for g in group_ids.unique():
            rows = torch.nonzero(group_ids == g).flatten()
            keys = [tuple(paths[i, :1 + d].tolist()) for i in rows.tolist()]
            members = {n: [r for r, k in zip(rows.tolist(), keys) if k == n and bool(keep[r])] for n in sorted(set(keys))}
            scored = [n for n, leaves in members.items() if leaves]
            if len(scored) < 2:
                continue  # one node (or none) with a kept leaf: nothing to compare at this depth
            node_value = torch.stack([rewards[members[n]].mean() for n in scored])
            normed = (node_value - node_value.mean()) / (node_value.std(unbiased=True) + eps)
            for n, v in zip(scored, normed):
                value[[r for r, k in zip(rows.tolist(), keys) if k == n]] = v
        out[:, depths == d] = value[:, None]
    return out.float()


def first_leaf_of_each_node(paths: Tensor, group_ids: Tensor, depths: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """``[B, K]`` bool: True where a row is the first kept leaf (in row order) of the node that takes that step, so
    that masking the others trains each shared transition once (``paths`` as in :func:`subtree_advantages`; ``keep``
    ``[B]``, default all: a dropped leaf's row is left out of the update, so its node is trained through another)."""
    keep = torch.ones(paths.shape[0], dtype=torch.bool) if keep is None else keep.bool()
    out = torch.zeros(paths.shape[0], depths.shape[0], dtype=torch.bool)
    for d in depths.unique().tolist():
        seen = set()
        first = torch.zeros(paths.shape[0], dtype=torch.bool)
        for i in range(paths.shape[0]):
            key = (int(group_ids[i]), *paths[i, :1 + d].tolist())
            first[i] = bool(keep[i]) and key not in seen
            if bool(keep[i]):
                seen.add(key)
        out[:, depths == d] = first[:, None]
    return out


class TreeGRPO(FlowGRPO):
    """Flow-GRPO's clipped loss on per-step advantages from :func:`subtree_advantages` (a ``tree_rollout`` run):
    ``objective: {name: "branching:TreeGRPO"}``. The branch steps are the rollout's, read from each sample's
    ``metadata["tree_branch_steps"]``. ``adv_eps`` is the normalisation's epsilon; ``objective.adv_clip`` still clamps
    in the loss. ``edges``: ``"per_leaf"`` trains a shared transition once per leaf below it (its rows repeat it);
    ``"once"`` keeps the advantage on the node's first kept leaf only (:func:`first_leaf_of_each_node`), as TreeGRPO
    trains each edge once."""

    def __init__(self, adv_eps: float = 1e-4, edges: str = "per_leaf", **grpo_kwargs):
        super().__init__(**grpo_kwargs)
        if edges not in ("per_leaf", "once"):
            raise ValueError(f"edges must be 'per_leaf' or 'once', got {edges!r}")
        self.adv_eps, self.edges = adv_eps, edges

    def advantages(self, rewards: Tensor, group_ids: Tensor, keep: Tensor, traj: Trajectory, components=None) -> Tensor:
        """``[B, K]``: each leaf's path's nodes, normalised per depth over the group; a node's value is the mean of
        its kept leaves (a dropped reward neither raises nor lowers it)."""
        shapes = {tuple(m.get("tree_branch_steps", ())) for m in traj.metadata}
        if len(shapes) != 1 or not next(iter(shapes)) or any("tree_path" not in m for m in traj.metadata):
            raise ConfigError("TreeGRPO trains on tree_rollout's samples: set sampling.rollout to branching:tree_rollout "
                              f"(their metadata hold {sorted(shapes)} as branch steps)")
        branch_steps = list(next(iter(shapes)))
        paths = torch.tensor([[m["tree_root"], *m["tree_path"]] for m in traj.metadata], dtype=torch.long)
        depths = step_depths(branch_steps, traj.num_steps)
        kept = keep & torch.isfinite(rewards)
        adv = subtree_advantages(torch.where(kept, rewards, torch.zeros(())), group_ids, paths, depths, self.adv_eps, keep=kept)
        if self.edges == "once":
            adv = adv * first_leaf_of_each_node(paths, group_ids, depths, keep=kept)
        return adv
