"""``flowalign eval``: score a model (optionally with a LoRA) on a prompt set, per category.

    flowalign eval --model assets/toy --lora runs/toy_grpo --prompts assets/prompts/shapes_heldout.jsonl \\
        --reward shapes --num-samples 512 --seed 0 --out runs/toy_grpo/eval

Steps and guidance default to the model's recommended settings (the toy's ``flowalign_toy.json``:
10 steps, guidance 4.5; the toy recipes set the same as ``sampling.eval_num_steps`` / ``guidance_scale``,
which the trainer's held-out report uses), so the command above reproduces ``runs/toy_grpo/report.md``'s
aligned accuracy; a model without them samples 40 steps at guidance 4.5. A recipe of your own reports at
its ``sampling.eval_num_steps`` (40 unless set): pass ``--steps`` to match it.

Prints the per-category table (:meth:`flowalign.evaluation.EvalResult.table`) and writes
``eval.json`` and ``eval.md`` to ``--out``. Sampling is the noise-free Euler ODE with per-sample
seeds (:func:`flowalign.evaluation.evaluate`), so two runs with the same ``--seed`` and
``--num-samples`` (one with ``--lora``, one without) compare the models on identical noise.

Wiring into ``train/cli.py`` takes two lines::

    add_eval_arguments(subparsers.add_parser("eval", help="evaluate a model on a prompt set"))
    ...   if args.command == "eval": return main_eval(args)

With ``--corrected-by [QUALITY]`` every sample is also scored by an independent quality signal
``q`` (default ``image_stats_quality``: :class:`flowalign.corrected.ImageStatsQuality`, distance of
the image statistics from clean toy renders, or from ``--corrected-reference stats.json``) and a
second per-category table reports the target reward ``r``, ``q``, the samples flagged as degraded
(``q < 0.5``) and GDRO's corrected score ``r · (q − q0) + c`` (``--corrected-q0``,
``--corrected-c``; arXiv 2601.02036 §5), so a reward bought with degraded images shows::

    flowalign eval --lora runs/toy_gdro --reward shapes --corrected-by --corrected-q0 0.5

With ``--compare EVAL_JSON`` (an ``eval.json`` written by an earlier ``flowalign eval --out``, or
its folder) the new evaluation is set against that one, sample by sample: the per-category
deltas with 95% Newcombe intervals (:func:`flowalign.evaluation.compare`; as bars in ``compare.png``
with ``--out``), the failure modes before → after for a reward that labels them, and the prompts
that moved most. Both must have
drawn the same prompts, seeds and steps; anything else is refused::

    flowalign eval --out runs/base_eval                                   # the base model
    flowalign eval --lora runs/toy_gdro --compare runs/base_eval --out runs/gdro_eval

With ``--out`` every scored batch is written to ``OUT/eval_partial`` at once
(:class:`flowalign.eval_journal.EvalJournal`), so a killed or interrupted evaluation is resumed by
running the same command again: the batches already scored are read back (after a check of their
initial noise) and only the rest is sampled, with the result of an uninterrupted run. The folder is
removed once ``eval.json`` is written. A partial evaluation under other settings (model files,
LoRA, prompts, steps, guidance, seed, reward, ...) is refused; ``--restart`` discards it. Another
``--batch-size`` or ``--on-error`` is not refused (see :func:`journal_key`).

Bad inputs (missing prompt file, unknown reward, missing model, LoRA for another architecture)
end with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

from flowalign.errors import ConfigError, FlowalignError
from flowalign.files import relative_to_cwd

logger = logging.getLogger(__name__)

EXIT_BELOW_THRESHOLD = 3  # --min-accuracy not reached (2: bad input, 1: a failure)

__all__ = ["EvalOptions", "add_eval_arguments", "main", "main_eval", "run_eval", "load_quality", "load_reference", "check_reference", "compare_reference", "comparison_markdown", "DEFAULT_MIN_SAMPLES", "DEFAULT_QUALITY"]

DEFAULT_MIN_SAMPLES = 512  # default: whole passes over the prompt set until at least this many samples
FALLBACK_STEPS, FALLBACK_GUIDANCE = 40, 4.5  # sampling defaults for a model without recommended settings
DEFAULT_QUALITY = "image_stats_quality"  # flowalign.corrected.ImageStatsQuality
JOURNAL_FOLDER = "eval_partial"  # under --out: the scored batches of an evaluation not yet finished
COMPARE_FIGURE = "compare.png"  # --compare with --out: the per-category bars, reference vs this evaluation


@dataclass
class EvalOptions:
    """What ``flowalign eval`` does; the fields mirror the command-line flags."""

    model: str = "toy"  # a local diffusers folder, or a builtin: 'toy' (assets/toy), 'tiny-sd3'
    prompts: str = "assets/prompts/shapes_heldout.jsonl"
    reward: str = "shapes"  # registered name, entry point or 'pkg.module:Class'
    reward_kwargs: Optional[str] = None  # the reward's keyword arguments as a JSON object (a recipe's rewards[i].kwargs)
    lora: Optional[str] = None  # pytorch_lora_weights.safetensors or the folder holding it
    num_samples: Optional[int] = None  # default: ceil(512 / P) passes over the P prompts
    samples_per_prompt: Optional[int] = None
    steps: Optional[int] = None  # default: the model's recommended steps (a toy's flowalign_toy.json), else 40
    guidance: Optional[float] = None  # default: the model's recommended CFG scale, else 4.5
    seed: int = 0
    batch_size: int = 32
    out: Optional[str] = None  # folder for eval.json / eval.md (nothing written when None)
    device: str = "cpu"
    dtype: str = "float32"
    variant: Optional[str] = None
    resolution: Optional[int] = None
    adapter: Optional[str] = None  # a registered family, an entry point or a dotted path (default: by the pipeline's class)
    adapter_kwargs: Optional[str] = None  # the adapter's own settings as a JSON object (model.adapter_kwargs of a recipe)
    on_error: str = "raise"
    progress: bool = True
    corrected_by: Optional[str] = None  # quality reward for the corrected score (None = no corrected table)
    corrected_q0: float = 0.0
    corrected_c: float = 0.0
    corrected_reference: Optional[str] = None  # ImageStatsQuality reference statistics (JSON from .save())
    compare: Optional[str] = None  # an earlier eval.json (or its folder) to set this evaluation against
    restart: bool = False  # discard the partial evaluation a killed run left in out/eval_partial instead of resuming it
    min_accuracy: Optional[float] = None  # exit EXIT_BELOW_THRESHOLD when the overall accuracy is below it (a CI gate)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``flowalign eval`` flags to ``parser`` (a subparser of the ``flowalign`` command)."""
    d = EvalOptions()
    parser.add_argument("--model", default=d.model, help="local diffusers folder, a hub id (owner/name: the hub cache, or a download where the hub is reachable), or 'toy' (assets/toy) or 'tiny-sd3' (default: %(default)s)")
    parser.add_argument("--lora", default=None, help="LoRA file or folder (pytorch_lora_weights.safetensors) to evaluate; default: the base model")
    parser.add_argument("--prompts", default=d.prompts, help="prompt file, .txt or .jsonl with a 'tag' per record (default: %(default)s)")
    parser.add_argument("--reward", default=d.reward, help="reward name, entry point or 'pkg.module:Class' (default: %(default)s)")
    parser.add_argument("--reward-kwargs", default=None, metavar="JSON", help="the reward's keyword arguments as a JSON object, "
                                                                            "e.g. '{\"url\": \"http://127.0.0.1:8765\"}' for --reward remote "
                                                                            "(a recipe's rewards[i].kwargs)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help=f"total samples, cycling over the prompts; at least one per prompt (default: whole passes until >= {DEFAULT_MIN_SAMPLES})")
    parser.add_argument("--samples-per-prompt", type=int, default=None, help="consecutive samples per prompt visit (default 1, or the passes above)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"ODE sampling steps (default: the model's recommended count: 10 for the toy, as the toy recipes' "
                             f"sampling.eval_num_steps, which the trainer's report uses; else {FALLBACK_STEPS})")
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"CFG scale, 1 = off (default: the scale the model folder recommends, 4.5 for the toy; {FALLBACK_GUIDANCE} for a model that names none)")
    parser.add_argument("--seed", type=int, default=d.seed, help="sample i starts from the noise of seed + i (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per transformer call (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder for eval.json and eval.md (default: print only)")
    parser.add_argument("--device", default=d.device, help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"], help="pipeline dtype (default: %(default)s)")
    parser.add_argument("--variant", default=None, help="diffusers weight-file variant of --model, e.g. fp16 for a folder of *.fp16.safetensors "
                        "files (default: the plain files)")
    parser.add_argument("--resolution", type=int, default=None, help="square image side in pixels (default: the pipeline's)")
    parser.add_argument("--adapter", default=None, help="the adapter: a registered family, an entry point of group 'flowalign.adapters' "
                                                        "or a dotted path 'package.module:Class' (default: chosen by the pipeline's class)")
    parser.add_argument("--adapter-kwargs", default=None, metavar="JSON", help="the adapter's own settings as a JSON object, "
                                                                             "e.g. '{\"num_frames\": 17}' (a recipe's model.adapter_kwargs)")
    parser.add_argument("--on-error", default=d.on_error, choices=["raise", "drop"], help="reward failures: raise or drop the sample")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--corrected-by", nargs="?", const=DEFAULT_QUALITY, default=None, metavar="QUALITY",
                        help=f"also report an independent quality signal q and the corrected score r·(q − q0) + c per category; "
                             f"QUALITY is a reward spec (default when the flag is given alone: {DEFAULT_QUALITY})")
    parser.add_argument("--corrected-q0", type=float, default=d.corrected_q0, help="q0 of the corrected score (default: %(default)s)")
    parser.add_argument("--corrected-c", type=float, default=d.corrected_c, help="c of the corrected score (default: %(default)s)")
    parser.add_argument("--corrected-reference", default=None, metavar="JSON",
                        help=f"reference statistics for {DEFAULT_QUALITY} (ImageStatsQuality.save); default: clean toy renders")
    parser.add_argument("--compare", default=None, metavar="EVAL_JSON",
                        help="an earlier eval.json (or its --out folder) of the same prompts, seeds and steps: "
                             "report the deltas per category, the failure modes and the prompts that moved most against it")
    parser.add_argument("--min-accuracy", type=float, default=None, metavar="A",
                        help=f"exit {EXIT_BELOW_THRESHOLD} (after printing and writing everything) when the overall accuracy, the "
                             "table's 'all' row, is below A (a fraction in [0, 1]): a gate for CI and sweeps")
    parser.add_argument("--restart", action="store_true",
                        help=f"with --out: discard the partial evaluation a killed run left in OUT/{JOURNAL_FOLDER} "
                             f"(by default the samples scored there are read back and the evaluation goes on from them)")
    return parser


def journal_key(options: EvalOptions, sampled: list, reward_kwargs: dict, device, reward_version: Optional[str] = None) -> dict:
    """What decides every sample's outcome, for :class:`flowalign.eval_journal.EvalJournal`: a partial evaluation
    under any other value is refused. ``--batch-size`` and ``--on-error`` are not in it (a rerun after running out
    of memory, or a failing reward, may change them): ``evaluate`` reads back only batches of the same sample indices,
    and scores again a batch with dropped samples when failures now raise. The model is named by its path and its
    files (:func:`flowalign.train.model.model_files_signature`), the LoRA and the sampled records by sha256; a reward
    that declares a ``version`` of its rules by it too (batches scored under other rules are not read back)."""
    from flowalign.checkpoint import sha256_file
    from flowalign.prompts import prompts_digest
    from flowalign.train.model import model_files_signature

    lora_sha = None
    if options.lora is not None:
        lora = Path(options.lora)
        lora_sha = sha256_file(lora / "pytorch_lora_weights.safetensors" if lora.is_dir() else lora)
    return {
        "model": options.model, "model_files": model_files_signature(options.model), "dtype": options.dtype, "resolution": options.resolution,
        "adapter": options.adapter, "adapter_kwargs": json_object_arg(options.adapter_kwargs, "--adapter-kwargs"),
        "device_type": getattr(device, "type", str(device)), "lora_sha256": lora_sha, "prompts_sha256": prompts_digest(sampled),
        "num_samples": len(sampled), "seed": options.seed, "steps": options.steps, "guidance": options.guidance,
        "reward": options.reward, "reward_kwargs": reward_kwargs, **({"variant": options.variant} if options.variant else {}),
        "corrected_by": options.corrected_by, "corrected_reference": options.corrected_reference,
        **({"reward_version": reward_version} if reward_version is not None else {}),
    }


def check_out_folder(out: str) -> None:
    """ConfigError, before anything is sampled, when ``--out`` could not take ``eval.json``: a file, a path under a
    file, or a folder (or its nearest existing parent) this process may not write into."""
    import os

    from flowalign.files import refuse_dangling_link

    path = Path(out)
    refuse_dangling_link(path, "--out")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out!r} is a file, not a folder for eval.json / eval.md")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out!r}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r}: {existing} is not writable here")


def load_reference(path: str):
    """The :class:`flowalign.evaluation.EvalResult` of ``--compare`` (``eval.json`` or the folder holding it).

    Raises:
        ConfigError: missing file, or not an evaluation with per-sample results.
    """
    from flowalign.evaluation import EvalResult

    p = Path(path)
    p = p / "eval.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"--compare {path!r}: no eval.json there (write one with flowalign eval --out DIR)")
    try:
        return EvalResult.from_json(p)
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"--compare {str(p)!r} is not a flowalign eval.json with per-sample results ({type(exc).__name__}: {exc})") from None


def check_reference(reference, reference_name: str, **asked) -> None:
    """Refuse a ``--compare`` reference sampled or scored differently: each of ``asked`` (``num_steps``,
    ``guidance_scale``, ``samples``, ``seed``, ``reward``, ``reward_kwargs``, ``correct_when``; None = unknown, not
    checked: evaluations written before a setting was recorded)
    must equal the reference's.

    Raises:
        ConfigError: naming the first setting that differs.
    """
    had = {"num_steps": reference.settings.get("num_steps"), "guidance_scale": reference.settings.get("guidance_scale"),
           "samples": reference.num_samples, "seed": reference.seeds[0] if reference.seeds else None,
           "reward": reference.settings.get("reward"), "reward_kwargs": reference.settings.get("reward_kwargs"),
           "correct_when": reference.settings.get("correct_when")}
    for key, value in asked.items():
        if value is not None and had[key] is not None and had[key] != value:
            raise ConfigError(f"--compare {reference_name}: it was sampled with {key}={had[key]}, this evaluation with {key}={value}")
    if asked.get("reward_kwargs") is not None and had["reward_kwargs"] is None:
        logger.warning("--compare %s records no reward kwargs (written before they were recorded): check that it was scored "
                       "with %s %s, as this evaluation is", reference_name, asked.get("reward"), asked["reward_kwargs"])


def check_reference_prompts(reference, reference_name: str, prompts: list, samples_per_prompt: Optional[int]) -> None:
    """Refuse, before sampling, a ``--compare`` reference whose samples drew other prompts than this evaluation
    will (another prompt file, or the same file spread by another ``--samples-per-prompt``).

    Raises:
        ConfigError: naming ``samples_per_prompt`` when that is what differs, else the prompts.
    """
    if list(reference.prompts) == list(prompts):
        return
    had = reference.settings.get("samples_per_prompt")
    if had is not None and samples_per_prompt is not None and had != samples_per_prompt:
        raise ConfigError(f"--compare {reference_name}: it was sampled with samples_per_prompt={had}, this evaluation with "
                          f"samples_per_prompt={samples_per_prompt}, so the same sample indices hold other prompts")
    theirs = list(reference.prompts)
    first = next((i for i, (a, b) in enumerate(zip(theirs, prompts)) if a != b), min(len(theirs), len(prompts)))
    shown = lambda seq: repr(seq[first]) if first < len(seq) else "missing"  # noqa: E731
    raise ConfigError(f"--compare {reference_name}: its sample {first} is {shown(theirs)}, this evaluation's is "
                      f"{shown(prompts)}: evaluate both on the same prompt file")


def compare_reference(reference, result, reference_name: str):
    """:func:`flowalign.evaluation.compare` of ``reference`` (as base) and ``result`` (as aligned),
    after :func:`check_reference` on the steps, guidance, reward and what counts as correct.

    Raises:
        ConfigError: the two evaluations drew different samples or used other steps / guidance.
    """
    from flowalign.evaluation import compare

    check_reference(reference, reference_name, num_steps=result.settings.get("num_steps"), guidance_scale=result.settings.get("guidance_scale"),
                    reward=result.settings.get("reward"), reward_kwargs=result.settings.get("reward_kwargs"),
                    correct_when=result.settings.get("correct_when"))
    mixed = reward_version_note(reference.settings, result.settings)
    if mixed:
        logger.warning("--compare %s: %s", reference_name, mixed)
    try:
        return compare(reference, result)
    except ValueError as exc:
        raise ConfigError(f"--compare {reference_name}: {exc}") from None


def reward_version_note(reference: dict, current: dict) -> str:
    """A warning when the reference evaluation scored with another version of the reward (``Reward.version``, recorded
    in the settings), or recorded none while this one has a version: the deltas would then mix two reward functions
    (the same LoRA, prompts and seeds read +6 points across the shapes verifier's fix). "" when they agree."""
    theirs, ours = reference.get("reward_version"), current.get("reward_version")
    if ours is None or theirs == ours:
        return ""
    if theirs is None:
        return (f"the reference records no version of reward {current.get('reward')!r} (written before versions were "
                f"recorded); this evaluation's is {ours!r}: if its rules changed in between, the deltas mix two reward functions")
    return (f"the reference was scored with version {theirs!r} of reward {current.get('reward')!r}, this evaluation with "
            f"{ours!r}: the deltas mix two reward functions; evaluate the reference again")


def comparison_markdown(reference, result, reference_name: str, comparison=None, figure: Optional[str] = None) -> str:
    """Markdown for ``result`` set against ``reference`` (same prompts, seeds and noise): the
    per-category deltas, failure modes (when both carry labels) and the prompts that moved most.
    ``comparison`` is :func:`compare_reference`'s (computed when None); ``figure`` names an image of
    it to link under the table (``flowalign eval --out`` writes ``compare.png``).

    Raises:
        ConfigError: the two evaluations drew different samples or used other steps / guidance.
    """
    from flowalign.evaluation import ALL, align_tags, prompt_changes
    from flowalign.report import failure_section, failure_tables, prompt_section

    if comparison is None:
        comparison = compare_reference(reference, result, reference_name)
    overall = comparison.rows[ALL]
    lines = [f"## Against {reference_name}", "",
             f"Accuracy {100 * overall['base'].accuracy:.1f}% → {100 * overall['aligned'].accuracy:.1f}% "
             f"({100 * overall['delta']:+.1f} points, 95% CI [{100 * overall['delta_low']:+.1f}, {100 * overall['delta_high']:+.1f}]); "
             "base columns are the reference, aligned columns this evaluation."
             + (f" {comparison.one_sided} samples scored in one evaluation only (the other dropped them) are left out of both."
                if comparison.one_sided else ""), ""]
    mixed = reward_version_note(reference.settings, result.settings)
    if mixed:
        lines += [f"**Warning**: {mixed}", ""]
    lines += [comparison.table(), ""]
    if figure is not None:
        lines += [f"![accuracy per category, reference vs this evaluation]({figure})", ""]
    lines += failure_section(failure_tables(reference, result))
    tags = align_tags(reference, result)[1].tags  # as compare counted them
    lines += prompt_section(prompt_changes(result.prompts, tags, reference.correct().tolist(), result.correct().tolist()), full_list=None)
    return "\n".join(lines)


def _options(args: Union[argparse.Namespace, EvalOptions, dict]) -> EvalOptions:
    if isinstance(args, EvalOptions):
        options = dataclasses.replace(args)
    else:
        values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        names = {f.name for f in fields(EvalOptions)}
        options = EvalOptions(**{k: v for k, v in values.items() if k in names})
    if options.steps is None or options.guidance is None:
        recommended = _recommended_settings(options.model)
        if options.steps is None:
            options.steps = int(recommended.get("num_inference_steps", FALLBACK_STEPS))
        if options.guidance is None:
            options.guidance = float(recommended.get("guidance_scale", FALLBACK_GUIDANCE))
    return options


def json_object_arg(text: Optional[str], flag: str) -> dict:
    """A JSON-object flag's value (``--adapter-kwargs``, ``--reward-kwargs``, ``flowalign reward serve --kwargs``) as a
    dict (``{}`` when unset); ConfigError naming ``flag`` for anything but a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} is not JSON ({exc}): it must be a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _check_numbers(options: EvalOptions) -> None:
    """One-line ConfigErrors, before anything loads, for settings training would refuse too."""
    from flowalign.train.runtime import check_device

    check_device(options.device, "--device")
    if not (math.isfinite(options.guidance) and options.guidance >= 1.0):
        raise ConfigError(f"--guidance must be a finite number >= 1 (1 = no classifier-free guidance), got {options.guidance}")
    for flag, value in (("--steps", options.steps), ("--batch-size", options.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if options.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {options.seed}")
    if options.min_accuracy is not None and not 0.0 <= options.min_accuracy <= 1.0:
        raise ConfigError(f"--min-accuracy must be a fraction in [0, 1], got {options.min_accuracy}")


def _recommended_settings(model: str) -> dict:
    """A model folder's recommended sampling settings (the toy's ``flowalign_toy.json``), else ``{}``."""
    from flowalign.pipelines.toy import load_toy_meta
    from flowalign.train.model import resolve_path

    try:
        return load_toy_meta(resolve_path("assets/toy" if model == "toy" else model))
    except (OSError, ValueError):
        return {}


def _counts(options: EvalOptions, num_prompts: int) -> tuple[Optional[int], int]:
    """``(num_samples, samples_per_prompt)`` with the default of whole passes reaching 512 samples."""
    spp = options.samples_per_prompt
    if options.num_samples is None and spp is None:
        spp = max(1, math.ceil(DEFAULT_MIN_SAMPLES / num_prompts))
    return options.num_samples, 1 if spp is None else spp


def load_quality(spec: str, reference: Optional[str] = None):
    """The quality reward of ``--corrected-by``: a reward spec, with ``reference`` for ImageStatsQuality."""
    import flowalign.corrected  # noqa: F401 - registers image_stats_quality
    from flowalign.rewards import load_reward

    if reference is not None:
        if spec != DEFAULT_QUALITY:
            raise ConfigError(f"--corrected-reference only applies to --corrected-by {DEFAULT_QUALITY}, not {spec!r}")
        if not Path(reference).is_file():
            raise ConfigError(f"--corrected-reference {reference!r} does not exist{relative_to_cwd(reference)}")
        try:
            return load_reward(spec, reference=reference)
        except (ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"--corrected-reference {reference}: {' '.join(str(exc).split())}") from None
    return load_reward(spec)


def run_eval(args: Union[argparse.Namespace, EvalOptions, dict]):
    """Run one evaluation; returns the :class:`flowalign.evaluation.EvalResult`.

    Prompts and reward are checked before the model is loaded, so a typo fails fast. With
    ``corrected_by`` the result carries ``result.corrected``: ``{"q0", "c", "quality",
    "categories": {tag: CategoryCorrected}, "quality_scores": [N]}`` (else None); with ``compare``,
    ``result.comparison_md`` holds :func:`comparison_markdown` (else None). A reference that turns out
    to hold other samples (other prompts or noise) is refused after ``eval.json`` is written.

    Raises:
        PromptFileError: the prompt file is missing or malformed.
        ConfigError: unknown reward, missing model folder, bad counts.
        LoraMismatchError: the LoRA does not fit the model.
    """
    from flowalign.config import ModelConfig
    from flowalign.evaluation import evaluate
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward

    options = _options(args)
    _check_numbers(options)
    if options.out is not None:
        check_out_folder(options.out)
    if options.lora is not None and not Path(options.lora).exists():
        raise ConfigError(f"--lora {options.lora!r} does not exist{relative_to_cwd(options.lora)} (give "
                          "pytorch_lora_weights.safetensors or its folder)")
    if options.lora is not None:
        from flowalign.lora import read_lora_file

        read_lora_file(options.lora)  # a folder without the file, or not safetensors: before the model loads
    reference = load_reference(options.compare) if options.compare is not None else None
    from flowalign.train.model import resolve_path

    records = load_prompts(resolve_path(options.prompts))  # assets/...: the packaged copy where the path is not here
    reward_kwargs = json_object_arg(options.reward_kwargs, "--reward-kwargs")
    reward = load_reward(options.reward, **reward_kwargs)
    from flowalign.rewards.base import check_reward_prompts

    if options.on_error == "raise":  # a verifier's grammar, before the model loads (under drop such samples are dropped)
        check_reward_prompts(reward, records, options.reward, f"prompts of {options.prompts}")
    tap = None
    if options.corrected_by is not None:
        from flowalign.corrected import QualityTap

        for name in ("corrected_q0", "corrected_c"):
            if not math.isfinite(getattr(options, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(options, name)}")
        tap = QualityTap(reward, load_quality(options.corrected_by, options.corrected_reference), on_error=options.on_error)
    elif options.corrected_reference is not None:
        raise ConfigError("--corrected-reference needs --corrected-by")
    num_samples, spp = _counts(options, len(records))
    from flowalign.evaluation import sample_indices

    indices = sample_indices(len(records), num_samples, spp)  # check the counts before loading the model
    if reference is not None:  # refuse a mismatch before sampling (compare() checks prompts, seeds and noise after)
        from flowalign.rewards.base import reward_name

        check_reference(reference, options.compare, num_steps=options.steps, guidance_scale=options.guidance, samples=len(indices),
                        seed=options.seed, reward=reward_name(tap if tap is not None else reward), reward_kwargs=reward_kwargs)
        check_reference_prompts(reference, options.compare, [records[i].prompt for i in indices], spp)

    from flowalign.train.model import build_adapter

    accelerator, device = _launch(options)
    try:
        adapter = build_adapter(ModelConfig(pretrained=options.model, dtype=options.dtype, variant=options.variant,
                                            resolution=options.resolution, adapter=options.adapter,
                                            adapter_kwargs=json_object_arg(options.adapter_kwargs, "--adapter-kwargs")), device)
    except ConfigError as exc:  # the trainer's wording names the recipe key; here it is the flag
        raise ConfigError(str(exc).replace("model.pretrained=", "--model ").replace("model.resolution=", "--resolution ")
                          .replace("model.variant=", "--variant ").replace("model.variant", "--variant")
                          .replace("model.adapter_kwargs", "--adapter-kwargs")) from None
    from flowalign.train.runtime import to_device

    to_device(reward, device)
    shard = None if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    main_process = accelerator is None or accelerator.is_main_process
    from flowalign.train.runtime import gather_shares, release_process_group

    journal = None
    if options.out is not None:  # every scored batch goes to out/eval_partial at once: a killed evaluation resumes from it
        from flowalign.eval_journal import EvalJournal

        key = journal_key(options, [records[i] for i in indices], reward_kwargs, device, getattr(reward, "version", None))
        journal = EvalJournal(Path(options.out) / JOURNAL_FOLDER, key, share=shard or (0, 1), restart=options.restart)
    result = evaluate(
        adapter, records, tap if tap is not None else reward, num_samples=num_samples, samples_per_prompt=spp, num_steps=options.steps,
        guidance_scale=options.guidance, seed=options.seed, batch_size=options.batch_size, lora=options.lora,
        on_error=options.on_error, keep_images=0, progress=options.progress and main_process, shard=shard, gather=gather_shares,
        journal=journal, extra_details=("quality",) if tap is not None else (),
    )
    result.settings.update({"model": options.model, "prompts_file": str(options.prompts), "device": options.device, "dtype": options.dtype,
                            **({"variant": options.variant} if options.variant else {}),
                            "reward_kwargs": reward_kwargs,
                            "processes": 1 if accelerator is None else accelerator.num_processes})
    if accelerator is not None:
        release_process_group(accelerator)  # every process has the whole result; the process group is released
    result.main_process = main_process
    result.corrected = None
    if tap is not None:
        from flowalign.corrected import corrected_summary

        result.corrected = {
            "quality": options.corrected_by, "q0": options.corrected_q0, "c": options.corrected_c, "reference": options.corrected_reference,
            "categories": corrected_summary(result.tags, result.scores, result.extra["quality"], options.corrected_q0, options.corrected_c),
            "quality_scores": result.extra["quality"],
        }
    result.comparison_md, comparison, refused = None, None, None
    if reference is not None:
        try:
            comparison = compare_reference(reference, result, options.compare)
            result.comparison_md = comparison_markdown(reference, result, options.compare, comparison,
                                                       figure=COMPARE_FIGURE if options.out is not None else None)
        except ConfigError as exc:  # the samples are drawn: write them (below) before refusing the comparison
            refused = exc
    if options.out is not None and main_process:
        from flowalign.files import write_text_atomic

        out = Path(options.out)
        _warn_replaced(out / "eval.json", result.settings)
        out.mkdir(parents=True, exist_ok=True)
        data = result.to_dict()
        if result.corrected is not None:
            data["corrected"] = {**{k: v for k, v in result.corrected.items() if k not in ("categories", "quality_scores")},
                                 "categories": {k: v.to_dict() for k, v in result.corrected["categories"].items()},
                                 "quality_scores": result.corrected["quality_scores"].tolist()}
        write_text_atomic(out / "eval.json", json.dumps(data, indent=1, allow_nan=False) + "\n")  # EvalResult.from_json reads it
        if comparison is not None:
            from flowalign.plots import category_bars

            category_bars(comparison.rows, out / COMPARE_FIGURE, labels=("reference", "this evaluation"),
                          title=f"accuracy per category against {Path(options.compare).name}")
        title = f"{options.model}" + (f" + LoRA {options.lora}" if options.lora else "") + f" on {options.prompts}"
        header = (f"# Evaluation: {title}\n\nreward `{options.reward}`, {result.num_samples} samples, {options.steps} ODE steps, "
                  f"guidance {options.guidance}, seed {options.seed}, {result.wall_time:.1f} s\n\n")
        write_text_atomic(out / "eval.md", header + result.table() + "\n" + (f"\n{_corrected_table(result, options)}\n" if tap is not None else "")
                          + (f"\n{result.comparison_md}\n" if result.comparison_md else ""))
        journal.remove()  # eval.json holds every sample now
    if refused is not None:
        raise refused
    return result


def _warn_replaced(path: Path, settings: dict) -> None:
    """Warn when ``path`` (an earlier ``eval.json``) holds an evaluation under other settings, which this one replaces:
    another model, LoRA, prompt file, reward or sampling (a rerun of the same evaluation replaces it silently)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):  # none, or not an evaluation: nothing to compare
        return
    names = ("model", "lora", "prompts_file", "reward", "reward_kwargs", "num_samples", "num_steps", "guidance_scale", "seed")
    differ = [name for name in names if earlier.get(name) != settings.get(name)]
    if differ:
        shown = ", ".join(f"{name} {earlier.get(name)!r} -> {settings.get(name)!r}" for name in differ[:3])
        logger.warning("%s held another evaluation (%s); it is replaced", path, shown)


def _launch(options: EvalOptions) -> tuple:
    """``(accelerator or None, device)``. Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every
    process samples every N-th sample (``evaluate``'s ``shard``) on its own device and the main one writes; a
    single process uses ``--device``."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, torch.device(options.device)
    from flowalign.train.runtime import make_accelerator

    accelerator = make_accelerator(timeout_min=120.0)
    if torch.device(options.device).type != accelerator.device.type:
        raise ConfigError(f"--device {options.device}: this launch's processes run on {accelerator.device.type} (one device each)")
    return accelerator, accelerator.device


def _corrected_table(result, options: EvalOptions) -> str:
    from flowalign.corrected import corrected_table

    return corrected_table(result.corrected["categories"], reward=options.reward, quality="q", q0=options.corrected_q0, c=options.corrected_c)


def main_eval(args: Union[argparse.Namespace, EvalOptions]) -> int:
    """Body of ``flowalign eval``: run, print the table; errors as one line on stderr, exit 2."""
    from safetensors import SafetensorError

    try:
        result = run_eval(args)
    except (FlowalignError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())
        print(f"flowalign eval: error: {message}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:  # a disk that filled up, a folder that cannot be written: the batches scored stay
        from flowalign.errors import one_line

        out = _options(args).out
        hint = f"; rerun the same command to go on from the batches scored in {Path(out) / JOURNAL_FOLDER}" if out else ""
        print(f"flowalign eval: error: {one_line(exc)}{hint}", file=sys.stderr)
        return 1
    if not getattr(result, "main_process", True):  # another process of a launch: the main one prints and writes
        return 0
    print(result.table())
    if getattr(result, "corrected", None) is not None:
        print()
        print(_corrected_table(result, _options(args)))
    if getattr(result, "comparison_md", None):
        print()
        print(result.comparison_md)
    options = _options(args)
    if options.out is not None:
        print(f"wrote {Path(options.out) / 'eval.json'} and {Path(options.out) / 'eval.md'}")
    overall = result.categories["all"]
    if options.min_accuracy is not None and not overall.accuracy >= options.min_accuracy:  # NaN (nothing scored) fails too
        print(f"flowalign eval: accuracy {overall.accuracy:.4f} ({overall.correct}/{overall.count}) is below --min-accuracy "
              f"{options.min_accuracy:g}", file=sys.stderr)
        return EXIT_BELOW_THRESHOLD
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m flowalign.train.eval_cli [flags]``: the same as ``flowalign eval``."""
    parser = add_eval_arguments(argparse.ArgumentParser(prog="flowalign eval", description="Evaluate a model on a prompt set, per category."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return main_eval(args)


if __name__ == "__main__":
    sys.exit(main())
