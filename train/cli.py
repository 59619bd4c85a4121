"""The ``flowalign`` command.

    flowalign train [--config F] [--set section.key=value ...] [--resume [DIR]] [--overwrite]
    flowalign eval ...        (see ``flowalign eval --help``)
    flowalign generate --config F [--set key=value ...]
    flowalign offline --config F [--set key=value ...] [--resume [DIR]] [--overwrite]
    flowalign config [--for train|offline|generate] [--config F] [--set key=value ...]
                              (the resolved recipe, every key with its help)
    flowalign reward list     (every reward a recipe can name, with its summary)
    flowalign reward serve NAME [--kwargs JSON] [--host H] [--port P] [--max-pending N] [--device D]
                              (score requests of the ``remote`` reward with NAME: flowalign.rewards.remote)

``flowalign train`` with no ``--config`` runs the default recipe ``train/configs/toy_grpo.yaml``.
``--resume`` continues the run in the config's ``train.output_dir`` from its newest valid
checkpoint; ``--resume DIR`` continues the run in DIR (reading ``DIR/config.yaml`` when no
``--config`` is given) or from the checkpoint folder DIR itself. Any configuration or input error
prints one line on stderr and exits with status 2 before anything is written; a failure once
training runs (non-finite losses, a reward raising under ``on_error: raise``, a checkpoint that
cannot be written) prints one line and exits with status 1. ``flowalign offline`` (GDRO /
Diffusion-DPO from a store written by ``flowalign generate``) follows the same rules.

Several processes: ``torchrun --standalone --nproc_per_node N -m flowalign.train.cli train ...``
(or ``accelerate launch --multi_gpu --num_processes N -m flowalign.train.cli train ...``, which
falls back to CPU/gloo without CUDA; ``accelerate launch --cpu --num_processes N`` starts ONE
process in accelerate 1.x).
"""
from __future__ import annotations

import argparse
import signal
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import flowalign
from flowalign.errors import Aborted, FlowalignError, TrainingStopped

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_RECIPE = CONFIG_DIR / "toy_grpo.yaml"
EXIT_USAGE = 2


EXIT_FAILURE = 1  # training started and failed (non-finite losses, a reward raising, a checkpoint that cannot be written)


def _write_errors() -> tuple:
    """What a full disk or a read-only folder raises (safetensors has its own error type)."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def _error(command: str, exc: BaseException, status: int = EXIT_USAGE) -> int:
    from flowalign.errors import one_line

    print(f"flowalign {command}: error: {one_line(exc)}", file=sys.stderr)
    return status


def _stopped(command: str, exc: TrainingStopped, main_process: bool = True) -> int:
    """Report a run stopped by a signal (one line, main process only); returns ``128 + signum``."""
    if main_process:
        print(f"flowalign {command}: {exc}", file=sys.stderr)
    return exc.exit_status


def _aborted(command: str, exc: Aborted) -> int:
    """Report a run aborted by a second signal (one line); returns ``128 + signum`` (143 for SIGTERM)."""
    print(f"flowalign {command}: {exc} (continue with --resume: from the last checkpoint written, or from the start if there is none)",
          file=sys.stderr)
    return 128 + exc.signum


def build_parser() -> argparse.ArgumentParser:
    """The ``flowalign`` argument parser: train, eval, generate, offline, config."""
    parser = argparse.ArgumentParser(prog="flowalign", description="RL alignment of diffusion / flow-matching generators.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {flowalign.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,generate,offline,config,reward}")

    train = sub.add_parser("train", help="train a LoRA with an online RL recipe (default: the toy recipe)",
                           description=f"Train with a recipe YAML (default: {DEFAULT_RECIPE.name}).")
    train.add_argument("--config", help=f"recipe YAML (default: {DEFAULT_RECIPE.relative_to(CONFIG_DIR.parent.parent)})")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                       help="continue the run in train.output_dir, or in DIR (a run folder or a checkpoint folder)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")

    from flowalign.train.eval_cli import add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="evaluate a model (optionally with a LoRA) on a prompt set"))

    generate = sub.add_parser("generate", help="write samples and rewards into a rollout store (offline objectives)")
    generate.add_argument("--config", help="generation YAML (default: the built-in defaults)")
    generate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value (repeatable)")

    offline = sub.add_parser("offline", help="train a LoRA with an offline objective (GDRO, Diffusion-DPO, AWM) from a rollout store",
                             description="Train from a store written by `flowalign generate` (recipe keys: flowalign.train.offline_trainer.OfflineConfig).")
    offline.add_argument("--config", help="offline recipe YAML, e.g. train/configs/toy_gdro.yaml (default: the built-in defaults)")
    offline.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set objective_kwargs.beta=8 (repeatable)")
    offline.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                         help="continue the run in output_dir, or in DIR (a run folder, whose offline_config.yaml is then the "
                              "recipe, or a checkpoint folder), from its newest checkpoint")
    offline.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    config = sub.add_parser("config", help="print a training recipe resolved, every key with its help (YAML that --config reads)",
                            description="Print the recipe (default: the toy recipe) with overrides applied and checked, as YAML "
                                        "with each key's help as a comment; save it and pass it back with --config.")
    config.add_argument("--config", help=f"recipe YAML (default: {DEFAULT_RECIPE.relative_to(CONFIG_DIR.parent.parent)} for train, "
                                         "the built-in defaults for offline and generate)")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    config.add_argument("--for", dest="kind", choices=("train", "offline", "generate"), default="train",
                        help="which command's keys: train (default), offline or generate")
    config.add_argument("--list", action="store_true",
                        help="list the shipped recipes (what --config NAME and base: NAME find) and launch configs, then exit")
    reward = sub.add_parser("reward", help="list the rewards, or serve one over HTTP for the `remote` reward",
                            description="`list`: every reward name a recipe can use (built-ins, plugins' entry points). "
                                        "`serve NAME`: score the `remote` reward's requests with NAME in this environment.")
    actions = reward.add_subparsers(dest="action", metavar="{list,serve}", required=True)
    actions.add_parser("list", help="every reward name a recipe can use, with its summary")
    serve = actions.add_parser("serve", help="serve a reward over HTTP (client: rewards: [{name: remote, kwargs: {url: ...}}])")
    serve.add_argument("name", help="a reward name, an entry point or package.module:Class")
    serve.add_argument("--kwargs", default="{}", help="the reward's keyword arguments as a JSON object")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, for a trainer elsewhere)")
    serve.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0: a free one, printed)")
    serve.add_argument("--device", default=None, help="where the reward scores: its models moved there, as training moves a "
                                                     "reward (default: cuda when this machine has a GPU, else cpu)")
    serve.add_argument("--max-pending", type=int, default=4,
                       help="request bodies held at once, each up to 1 GiB (default 4; more requests wait unread)")
    return parser


def run_reward(args: argparse.Namespace) -> int:
    """``flowalign reward list``: every reward name with its summary; ``flowalign reward serve NAME``: an HTTP server
    for the ``remote`` reward (flowalign.rewards.remote), until Ctrl-C."""
    from flowalign.errors import ConfigError
    from flowalign.rewards import load_reward
    from flowalign.rewards.base import describe_rewards

    if args.action == "list":
        rows = describe_rewards()
        width = max(len(name) for name, _ in rows)
        sys.stdout.write("".join(f"{name:<{width}}  {summary}\n" for name, summary in rows))
        sys.stdout.write("\nAny importable 'package.module:Class' (or a function) is a reward too, without registering it; "
                         "`flowalign config --set 'rewards=[{name: ...}]'` warns when it cannot load it (train refuses it).\n")
        return 0
    from flowalign.rewards.remote import check_max_pending, make_server, serve, server_url
    from flowalign.train.eval_cli import json_object_arg

    try:
        check_max_pending(args.max_pending)  # before the reward model loads
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535 (0: a free one), got {args.port}")
        kwargs = json_object_arg(args.kwargs, "--kwargs")
        import torch

        from flowalign.train.runtime import check_device

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device, "--device")  # a typo or a missing accelerator: one line, before the reward model loads
        server = make_server(load_reward(args.name, **kwargs), args.host, args.port, args.max_pending, device=device)
    except OSError as exc:  # the address: in use, not this machine's, not resolvable
        return _error("reward serve", ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"))
    except (FlowalignError, TypeError) as exc:
        return _error("reward serve", exc)
    url = server_url(server)
    print(f"serving reward {args.name!r} on {url} (rewards: [{{name: remote, kwargs: {{url: \"{url}\"}}}}])", flush=True)
    serve(server)
    return 0


def list_recipes() -> str:
    """The shipped recipes and launch configs, one line each: name, then the first line of its header comment."""
    from flowalign.config import packaged_recipe_dir

    def first_comment(path: Path) -> str:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#") and line.strip("# ").strip():
                return line.strip("# ").strip()
        return ""

    recipes = sorted(packaged_recipe_dir().glob("*.yaml"))
    launch = sorted((packaged_recipe_dir().parent / "accelerate").glob("*.yaml"))
    width = max(len(p.stem) for p in recipes + launch)
    lines = [f"recipes ({packaged_recipe_dir()}; --config NAME or base: NAME):"]
    lines += [f"  {p.stem:<{width}}  {first_comment(p)}" for p in recipes]
    lines += [f"launch configs ({launch[0].parent if launch else ''}; accelerate launch --config_file PATH):"]
    lines += [f"  {p.stem:<{width}}  {first_comment(p)}" for p in launch]
    return "\n".join(lines) + "\n"


def run_config(args: argparse.Namespace) -> int:
    """``flowalign config``: print the resolved recipe (every key with its help) as YAML; returns the exit status."""
    from flowalign.config import describe_config, load_config
    from flowalign.rewards import available_rewards, check_reward_spec
    from flowalign.train.generate import load_generate_config
    from flowalign.train.offline_trainer import load_offline_config

    if args.list:
        sys.stdout.write(list_recipes())
        return 0
    try:
        if args.kind == "offline":
            config = load_offline_config(args.config, list(args.overrides))
        elif args.kind == "generate":
            config = load_generate_config(args.config, list(args.overrides))
        else:
            config = load_config(args.config or DEFAULT_RECIPE, list(args.overrides))
            from flowalign.train.trainer_setup import build_objective

            build_objective(config)  # what `flowalign train` refuses before loading a model: the objective's arguments
            from flowalign.config import inert_settings

            for line in inert_settings(config):  # and what it warns of
                sys.stderr.write(f"flowalign config: warning: set but without effect: {line}\n")
        for reward in getattr(config, "rewards", None) or []:  # and the rewards' names and arguments
            if reward.name in available_rewards() or (("." in reward.name or ":" in reward.name) and _importable(reward.name)):
                check_reward_spec(reward.name, **reward.kwargs)
            else:  # a plugin of another machine (the SD3.5 recipes' geneval, a dotted path to its package): print the recipe, say so
                sys.stderr.write(f"flowalign config: warning: {_not_here(reward.name)}: train would refuse this recipe here\n")
    except (FlowalignError, FileNotFoundError) as exc:
        return _error("config", exc)
    sys.stdout.write(describe_config(config))
    return 0


def _resume_folder(resume) -> Optional[Path]:
    """The run folder of ``--resume DIR`` (a checkpoint folder ``<run>/checkpoints/iter_N`` names its run); None for a
    bare ``--resume``."""
    if not isinstance(resume, str):
        return None
    if not _is_checkpoint(resume):
        return Path(resume)
    folder = Path(resume)
    if len(folder.parts) < 3 or ".." in folder.parts:  # iter_000001 from inside checkpoints/: its run is not "."'s parent
        folder = Path(os.path.abspath(folder))
    return folder.parent.parent


def _is_checkpoint(resume) -> bool:
    """``--resume DIR`` names a checkpoint folder (``<run>/checkpoints/iter_N``, holding its manifest)."""
    from flowalign.checkpoint import MANIFEST

    return isinstance(resume, str) and (Path(resume) / MANIFEST).is_file()


def _train_config(args: argparse.Namespace):
    """The run's config: --config, else DIR/config.yaml when resuming DIR, else the toy recipe."""
    from flowalign.config import load_config

    path = args.config
    resume_dir = _resume_folder(args.resume)
    if path is None:
        path = resume_dir / "config.yaml" if resume_dir is not None and (resume_dir / "config.yaml").is_file() else DEFAULT_RECIPE
    overrides = list(args.overrides)
    if resume_dir is not None:
        overrides.append(f"train.output_dir={json.dumps(str(resume_dir))}")  # quoted: a folder name is not YAML ("exp #2", "off")
    return load_config(path, overrides)


CONTRADICTORY_FLAGS = "--resume continues the run in the output folder and --overwrite replaces it: pass one of them"


def _not_here(name: str) -> str:
    """Why reward ``name`` cannot load here: for a dotted path, the import's own reason (what ``train`` would say: the
    modules tried, and PYTHONPATH); for a name, the ones available."""
    from flowalign.plugins import import_object
    from flowalign.rewards import available_rewards

    if ":" in name or "." in name:
        try:
            import_object(name, "reward")
        except FlowalignError as exc:
            return str(exc)
    return f"reward {name!r} is not installed here (available: {', '.join(available_rewards())})"


def _importable(dotted: str) -> bool:
    """Whether the module of a dotted reward path (``pkg.mod:Name`` or ``pkg.mod.Name``) is installed here."""
    import importlib.util

    module = dotted.split(":", 1)[0] if ":" in dotted else dotted.rsplit(".", 1)[0]
    try:
        return bool(module) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is not installed
        return False


def run_train(args: argparse.Namespace) -> int:
    """``flowalign train``: set up, train and write the run's outputs; returns the exit status (2 bad input, 1 failure)."""
    from flowalign.train.trainer import Trainer

    trainer = None
    if args.resume and args.overwrite:
        return _error("train", CONTRADICTORY_FLAGS)
    try:
        config = _train_config(args)
        trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite)
        trainer.setup()
    except (FlowalignError, *_write_errors()) as exc:  # bad input, or an output folder that cannot be written
        if trainer is not None:
            trainer.cleanup()
        return _error("train", exc)
    try:
        metrics = trainer.train()
    except TrainingStopped as exc:  # SIGINT / SIGTERM: checkpointed at an iteration boundary
        return _stopped("train", exc, trainer.accelerator.is_main_process)
    except Aborted as exc:  # a second signal: no checkpoint of this iteration
        return _aborted("train", exc)
    except (FlowalignError, *_write_errors()) as exc:  # a disk that filled up mid-run included: --resume continues
        return _error("train", exc, EXIT_FAILURE)
    finally:
        trainer.cleanup()
    if not trainer.accelerator.is_main_process:
        return 0
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("reward/mean", "kl/ref", "frac_zero_std_groups"))
    print(f"done: {config.train.iterations} iterations{'; last batch ' + summary if summary else ''}; "
          f"LoRA in {Path(config.train.output_dir) / 'pytorch_lora_weights.safetensors'}{_heldout_line(Path(config.train.output_dir))}")
    return 0


def _heldout_line(run_dir: Path) -> str:
    """``"; held-out accuracy 28.9% -> 36.3% (+7.4 points), report.md"`` from the run's report.json, or "" without one."""
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        base, aligned = float(report["accuracy_base"]), float(report["accuracy_aligned"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return (f"; held-out accuracy {100 * base:.1f}% -> {100 * aligned:.1f}% ({100 * (aligned - base):+.1f} points), "
            f"{run_dir / 'report.md'}")


def _single_process(command: str) -> Optional[int]:
    """The exit status refusing a multi-process launch (WORLD_SIZE > 1) of a one-process command, else None: each
    process would write the same store or run folder (a store's manifest listed shards twice, for good)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return _error(command, f"flowalign {command} runs in one process, but this launch started {world} (WORLD_SIZE={world}): "
                           "run it without torchrun / accelerate launch")


def run_generate(args: argparse.Namespace) -> int:
    """``flowalign generate``: fill (or finish) a rollout store; returns the exit status."""
    from flowalign.train.generate import load_generate_config, run_generate as generate

    refused = _single_process("generate")
    if refused is not None:
        return refused

    try:
        path = generate(load_generate_config(args.config, list(args.overrides)))
    except (FlowalignError, FileNotFoundError) as exc:
        return _error("generate", exc)
    except _write_errors() as exc:  # the store keeps its finished shards: rerun to finish it
        return _error("generate", exc, EXIT_FAILURE)
    print(f"wrote {path}")
    return 0


def _offline_config(args: argparse.Namespace):
    """The offline run's config: --config, else DIR/offline_config.yaml when resuming DIR, else the built-in defaults;
    ``--resume DIR`` sets ``output_dir`` to DIR."""
    from flowalign.errors import CheckpointError, ConfigError
    from flowalign.train.offline_trainer import load_offline_config
    from flowalign.train.run_dir import refuse_other_kind

    path = args.config
    resume_dir = _resume_folder(args.resume)
    overrides = list(args.overrides)
    if resume_dir is not None:
        if not resume_dir.is_dir():
            raise CheckpointError(f"--resume {args.resume}: no such run folder or checkpoint folder")
        if path is None:
            refuse_other_kind(resume_dir, "offline")
            if not (resume_dir / "offline_config.yaml").is_file():
                raise ConfigError(f"--resume {args.resume}: {resume_dir} holds no offline_config.yaml, so it is not a "
                                  "flowalign offline run (pass --config with the run's recipe)")
            path = resume_dir / "offline_config.yaml"
        overrides.append(f"output_dir={json.dumps(str(resume_dir))}")  # quoted, as for train
    return load_offline_config(path, overrides)


def run_offline(args: argparse.Namespace) -> int:
    """``flowalign offline``: train a LoRA from a rollout store; returns the exit status (2 bad input, 1 failure)."""
    from flowalign.train.offline_trainer import OfflineTrainer

    refused = _single_process("offline")
    if refused is not None:
        return refused
    if args.resume and args.overwrite:
        return _error("offline", CONTRADICTORY_FLAGS)
    try:
        config = _offline_config(args)
        resume = args.resume if _is_checkpoint(args.resume) else bool(args.resume)
        trainer = OfflineTrainer(config, resume=resume, overwrite=args.overwrite).setup()
    except (FlowalignError, *_write_errors()) as exc:  # bad input, or an output folder that cannot be written
        return _error("offline", exc)
    try:
        history = trainer.train()
        path = trainer.save_final()
    except TrainingStopped as exc:
        return _stopped("offline", exc)
    except Aborted as exc:
        return _aborted("offline", exc)
    except (FlowalignError, *_write_errors()) as exc:
        return _error("offline", exc, EXIT_FAILURE)
    finally:
        trainer.close()
    loss = f"; loss {history[-1]['loss']:.4g}" if history else ""
    unapplied = f" ({trainer.unapplied_steps} without signal, not applied)" if trainer.unapplied_steps else ""
    print(f"done: {trainer.step} steps{unapplied}, {trainer.nfe} NFE, {trainer.seconds:.1f} s{loss}; LoRA in {path}")
    return 0


def log_level(verbose: bool) -> int:
    """DEBUG with ``-v``; else INFO on the launching process and WARNING on the others of a multi-process launch,
    whose setup lines would repeat once per process."""
    from flowalign.train.run_lock import launching_process

    if verbose:
        return logging.DEBUG
    return logging.INFO if launching_process() else logging.WARNING


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``flowalign`` console script; returns the exit status."""
    if hasattr(sys.stdout, "reconfigure") and (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="backslashreplace")  # an ASCII locale: "σ²" in a help text prints as "σ\xb2", not a traceback
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(args.verbose), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    previous = _terminate_as_interrupt()
    quiet_bars = _calm_bars_off_terminal()
    try:
        return _dispatch(args)
    except _Terminated:  # SIGTERM (a scheduler, a launcher) outside a training loop's graceful stop, which handles its own
        print(f"flowalign {args.command}: terminated (SIGTERM); {interrupted_hint(args)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # Ctrl-C outside a training loop's graceful stop: setup, the final evaluation and report
        print(f"flowalign {args.command}: interrupted (Ctrl-C); {interrupted_hint(args)}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for name in quiet_bars:
            os.environ.pop(name, None)


# seconds between progress-bar redraws when stderr is a file or a pipe (nohup, a scheduler's log): every redraw there is
# a line fragment kept forever, ten a second by default
OFF_TERMINAL_BAR_INTERVAL = "30"


def _calm_bars_off_terminal() -> list[str]:
    """When stderr is not a terminal, set ``TQDM_DELAY`` and ``TQDM_MININTERVAL`` to :data:`OFF_TERMINAL_BAR_INTERVAL`
    (those the user did not set) while the command runs; returns the names it set (the caller removes them). A phase
    shorter than that draws no bar at all (in a file its 0% frame and erasure prefixed the next log line), a longer one
    redraws at most that often; ``TQDM_DISABLE=1`` or ``--no-progress`` / ``progress: false`` hide them all."""
    try:
        on_terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        on_terminal = False
    if on_terminal:
        return []
    names = [name for name in ("TQDM_MININTERVAL", "TQDM_DELAY") if name not in os.environ]
    for name in names:
        os.environ[name] = OFF_TERMINAL_BAR_INTERVAL
    return names


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so it ends as a Ctrl-C does (files are written atomically) and says so."""


def _terminate_as_interrupt():
    """Make SIGTERM raise :class:`_Terminated` while a command runs; returns the handler to restore (None where signal
    handlers cannot be set: not the main thread). A SIGTERM left to its default ended setup, the final report or an
    evaluation with exit status 143 and nothing printed."""
    def handler(signum, frame):
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread of the main interpreter
        return None


# what a Ctrl-C outside the training loop leaves (every file is written atomically)
_RESUME_HINT = ("continue with --resume: from the last checkpoint written (a finished run's writes its outputs again, its "
                "held-out report from the batches already scored), or from the start if there is none")
INTERRUPTED_HINT = {"train": _RESUME_HINT, "offline": _RESUME_HINT,
                    "generate": "rerun the same command to finish the store (its finished shards are kept)"}


def interrupted_hint(args: argparse.Namespace) -> str:
    """What the interrupted command left to continue from (:data:`INTERRUPTED_HINT`; ``eval`` with ``--out``: its journal)."""
    if args.command == "eval" and getattr(args, "out", None):
        from flowalign.train.eval_cli import JOURNAL_FOLDER

        return f"rerun the same command to go on from the batches already scored (kept in {Path(args.out) / JOURNAL_FOLDER})"
    return INTERRUPTED_HINT.get(args.command, "nothing to continue")


def _dispatch(args: argparse.Namespace) -> int:
    """Run ``args.command``; returns its exit status."""
    if args.command == "train":
        return run_train(args)
    if args.command == "eval":
        from flowalign.train.eval_cli import main_eval

        return main_eval(args)
    if args.command == "offline":
        return run_offline(args)
    if args.command == "config":
        return run_config(args)
    if args.command == "reward":
        return run_reward(args)
    return run_generate(args)


if __name__ == "__main__":
    sys.exit(main())
