"""The command line: splits | wrap | export | evaluate | train | demo | bench | reproduce |
finetune-detection.

A user mistake prints one line, ``collabsurgery: error: ...``, and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from collabsurgery.errors import Interrupted, TrainingStopped, UserError

if TYPE_CHECKING:
    from collabsurgery.common.arguments import Declared


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """As argparse's; an option without help text still shows its default in --help."""
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings and action.default not in (
                None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
        return action


class _ShowDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, unless its text already says it or the
    default is unset (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == []):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Skipped(Exception):
    """A subcommand whose options are not built in this process (see :class:`_OneCommand`)."""


class _OneCommand:
    """The subparsers, building the options of ``command`` only (None: of every command).

    Every command still gets its parser and help line, so ``collabsurgery --help`` lists them
    all; an option builder that needs heavy imports (torch, the graph kinds) runs only for the
    command given, so ``--help`` is fast."""

    def __init__(self, sub: Any, command: str | None):
        self.sub, self.command = sub, command

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = self.sub.add_parser(name, formatter_class=_ShowDefaults, **kwargs)
        if self.command is not None and name != self.command:
            raise _Skipped
        return p


def _input_size(text: str) -> tuple[int, int, int]:
    try:
        return (3, int(text), int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer image size, got '{text}'")


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text}'")
        return value
    return parse


def _model_kwargs(args: argparse.Namespace) -> dict:
    return {} if args.num_classes is None else {"num_classes": args.num_classes}


def cmd_splits(args: argparse.Namespace) -> None:
    """Print the clean split points of a model, one per line."""
    from collabsurgery.graphs import splits
    from collabsurgery.surgery.cuts import NO_SPLIT_POINTS

    points = splits(args.model, input_size=args.input_size, **_model_kwargs(args))
    if not points:
        raise UserError(f"{args.model} has no clean split point; valid split points: "
                        f"{NO_SPLIT_POINTS}")
    print("\n".join(points))


#: builder arguments that are not graph options: given otherwise (the model, --input-size,
#: --num-classes) or with a meaning of their own per command (--execution)
_NOT_GRAPH_OPTIONS = ("model", "input_size", "model_kwargs", "execution")
#: spellings of graph options from before they were generated, kept working
_OLD_SPELLINGS = {"seed": ("--route-seed",), "p": ("--dropout-p",)}
#: option placeholders other than the argument's name in capitals
_METAVARS = {"pretrained": "FILE"}


def _graph_declarations() -> dict[str, list[tuple[str, Declared]]]:
    """Every builder argument that is a graph option: name -> (kind, its declaration) for each
    registered graph kind that takes it, in registration order."""
    from collabsurgery.common.arguments import declarations
    from collabsurgery.graphs import GRAPH_KINDS

    found: dict[str, list[tuple[str, Declared]]] = {}
    for kind, builder in GRAPH_KINDS.items():
        for name, declared in declarations(builder).items():
            if name not in _NOT_GRAPH_OPTIONS:
                found.setdefault(name, []).append((kind, declared))
    return found


def _from_text(annotation: Any):
    """An argparse type reading a declared type's command-line form (a list: comma-separated)."""
    from collabsurgery.common.arguments import from_text

    def parse(text: str) -> Any:
        try:
            return from_text(annotation, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _graph_option_help(uses: list[tuple[str, Declared]]) -> str:
    """What an option does for each pattern that takes it, with its default there."""
    from collabsurgery.common.arguments import bare, text_form

    said: dict[tuple[str, str], list[str]] = {}
    for kind, declared in uses:
        default = "" if declared.default is None else f" (default {declared.default})"
        said.setdefault((declared.description, default), []).append(kind)
    text = "; ".join(f"{', '.join(kinds)}: {description}{default}"
                     for (description, default), kinds in said.items())
    annotation = uses[0][1].annotation
    if bare(annotation) not in (int, float, str) and get_origin(bare(annotation)) is not Literal:
        text += f"; given as {text_form(annotation)}"
    return text.replace("%", "%%")


def _add_graph_options(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """``--pattern`` and one option per graph builder argument, generated from the builders'
    declarations (type, description, default), so a new argument needs no edit here."""
    from collabsurgery.common.arguments import bare
    from collabsurgery.graphs import GRAPH_KINDS

    group = p.add_argument_group("graph options", "from the graph builders' declarations; "
                                 "each applies to the patterns named, unset: their default")
    group.add_argument("--pattern", choices=tuple(GRAPH_KINDS), default="tree",
                       help="the graph kind; peers: give several models, e.g. "
                            "resnet18,torchvision.mobilenet_v2")
    for name, uses in _graph_declarations().items():
        if name in skip:
            continue
        tp = bare(uses[0][1].annotation)
        kind = ({"choices": get_args(tp)} if get_origin(tp) is Literal else
                {"type": tp, "metavar": _METAVARS.get(name, name.upper())}
                if tp in (int, float, str) else
                {"type": _from_text(uses[0][1].annotation),
                 "metavar": _METAVARS.get(name, name.upper())})
        group.add_argument(f"--{name.replace('_', '-')}", *_OLD_SPELLINGS.get(name, ()),
                           dest=name, default=None, help=_graph_option_help(uses), **kind)


def _graph_arguments(args: argparse.Namespace) -> dict:
    """The graph options given on the command line (unset ones take the builder's defaults;
    one the pattern does not take is refused by name when the graph is built)."""
    given = {name: getattr(args, name, None) for name in _graph_declarations()}
    return {name: value for name, value in given.items() if value is not None}


def _models(text: str) -> str | list[str]:
    """``a,b`` -> a list of models (peers); one name stays a string."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names if len(names) > 1 else text


def cmd_wrap(args: argparse.Namespace) -> None:
    """Build a training graph, print what it costs, optionally save it."""
    from collabsurgery.graphs import wrap
    from collabsurgery.graphs.saving import save_graph
    from collabsurgery.measure.costs import describe

    net = wrap(_models(args.model), pattern=args.pattern, input_size=args.input_size,
               execution=args.execution, **_graph_arguments(args), **_model_kwargs(args))
    print(describe(net))
    if args.save:
        print(f"saved training graph to {save_graph(net, args.save)}")


def cmd_export(args: argparse.Namespace) -> None:
    """Export one head of a training graph file or a training run as a plain backbone."""
    from collabsurgery.export.from_run import export_from_source

    output = Path(args.output)
    which = " of the EMA weights" if args.weights == "ema" else ""
    _check_export_options(args)
    if args.format in ("onnx", "torch-export"):
        from collabsurgery.export.from_run import deploy_from_source

        verified, head = deploy_from_source(Path(args.source), args.head, output, args.format,
                                            args.weights, opset=args.opset,
                                            features_only=args.features_only)
        print(f"exported head {head}{which} to {verified.path}: {verified.describe()}")
        return
    if args.format == "safetensors":
        path, head = export_from_source(Path(args.source), args.head, output, args.weights)
        print(f"exported head {head}{which} to {path}")
        return
    from collabsurgery.export.model_folder import registering_module, save_timm_folder

    checked = []
    with tempfile.TemporaryDirectory(prefix="collabsurgery-export-") as tmp:
        path, head = export_from_source(Path(args.source), args.head,
                                        Path(tmp) / "head.safetensors", args.weights)
        folder = save_timm_folder(path, output, onnx=args.onnx, opset=args.opset,
                                  on_onnx=checked.append)
    import json

    module = registering_module(json.loads((folder / "config.json").read_text())["architecture"])
    first = f"import {module}  (it registers the architecture with timm), then " if module else ""
    print(f"exported head {head}{which} to {folder} (load: {first}timm.create_model("
          f"\"local-dir:{folder}\", pretrained=True))")
    for verified in checked:
        print(f"with {verified.path.name}: {verified.describe()}")


def _check_export_options(args: argparse.Namespace) -> None:
    """The export options that apply to ``--format`` only, refused with any other."""
    if args.onnx and args.format != "timm-folder":
        raise UserError(f"--onnx adds model.onnx to a model folder (--format timm-folder); "
                        f"for an ONNX file alone use --format onnx, not --format {args.format}")
    if args.opset is not None and not (args.format == "onnx" or args.onnx):
        raise UserError(f"--opset applies to --format onnx (or timm-folder --onnx), not "
                        f"--format {args.format}")
    if args.features_only and args.format not in ("onnx", "torch-export"):
        raise UserError(f"--features-only applies to --format onnx and torch-export, not "
                        f"--format {args.format} (a safetensors export loads as features with "
                        "cs.load_backbone(path, features_only=True))")
    if args.format == "timm-folder" and args.onnx:
        from collabsurgery.export.deploy import require_onnx

        require_onnx()


def cmd_finetune_detection(args: argparse.Namespace) -> None:
    """Fine-tune a detector on an exported backbone (see :mod:`collabsurgery.detection`)."""
    from collabsurgery.detection import run

    try:
        run(args)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; continue with --resume (from the last finished "
                          "epoch's checkpoint)") from None


def _sigmas(text: str) -> tuple[float, ...]:
    from collabsurgery.measure.robustness import check_sigmas

    try:
        return check_sigmas([float(v) for v in text.split(",")])
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got '{text}'")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Test accuracy of one head of a training run as a plain backbone; with ``--perturb``,
    under Gaussian noise on its weights (paper 002, Fig. 6), written to the run directory."""
    import torch
    from torch.utils.data import DataLoader

    from collabsurgery.config.recipe import data_arguments, load_recipe
    from collabsurgery.data.datasets import load_splits
    from collabsurgery.export.from_run import load_run, run_weights, select_head
    from collabsurgery.measure.robustness import (accuracy, check_sigmas, format_table,
                                                  perturbation_curve, save_robustness,
                                                  weights_dtype)
    from collabsurgery.models.backbones import create

    run_dir = Path(args.run)
    if args.exits:
        _evaluate_exits(run_dir)
        return
    weights = run_weights(run_dir, args.weights)
    net, history = load_run(run_dir, weights)
    head = select_head(run_dir, args.head, net, history, weights)
    spec = net.head_spec(head)
    model = create(spec)
    model.load_state_dict(net.head_state_dict(head))
    if args.perturb:  # before the data is read: noise that overflows the weights' dtype
        check_sigmas(args.perturb, weights_dtype(model))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    recipe = load_recipe(run_dir / "recipe.yaml")
    test = load_splits(**data_arguments(recipe.data), seed=recipe.seed).test
    loader = DataLoader(test, batch_size=256)
    print(f"{run_dir}: head {head} ({spec.qualified_name}) as a plain backbone on the test "
          f"split ({len(test)} examples)")
    if not args.perturb:
        print(f"test accuracy {accuracy(model, loader):.4f}")
        return
    result = perturbation_curve(model, loader, args.perturb, args.draws, args.seed)
    result.update(run=str(run_dir), head=head, architecture=spec.qualified_name,
                  examples=len(test))
    print(f"Gaussian noise on every parameter, {args.draws} draws per sigma, seed {args.seed}")
    print(format_table(result))
    paths = save_robustness(result, run_dir, f"{run_dir.name}, head {head} ({spec.qualified_name})")
    print("wrote " + " and ".join(map(str, paths)))


def _evaluate_exits(run_dir: Path) -> None:
    """BYOT's anytime table: each exit's test accuracy and FLOPs beside the full network's."""
    from torch.utils.data import DataLoader

    from collabsurgery.config.recipe import data_arguments, load_recipe
    from collabsurgery.data.datasets import load_splits
    from collabsurgery.measure.exits import anytime, format_anytime, run_with_objective

    graph, objective = run_with_objective(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    test = load_splits(**data_arguments(recipe.data), seed=recipe.seed).test
    print(f"{run_dir}: exits on the test split ({len(test)} examples)")
    print(format_anytime(anytime(graph, objective, DataLoader(test, batch_size=256))))


def cmd_train(args: argparse.Namespace) -> None:
    """Train (or resume) a recipe with Accelerate."""
    from accelerate import PartialState

    from collabsurgery.config.recipe import load_recipe
    from collabsurgery.rundir import checkpoint
    from collabsurgery.train.engine import run_directory, train

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        run_dir = train(recipe)
    except KeyboardInterrupt:
        ckpts = checkpoint.candidates(run_directory(recipe) / "checkpoints")
        raise Interrupted("interrupted; " + (
            f"resume with run.resume=auto from {ckpts[0].name}" if ckpts else
            "no checkpoint was written yet, so running it again starts over")) from None
    if PartialState().is_main_process:
        print(f"run directory: {run_dir}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the built-in digits: CL-ILR vs single model, export, reload."""
    from collabsurgery.train.demo import run_demo

    run_demo(args.recipe, args.overrides)


def cmd_bench(args: argparse.Namespace) -> None:
    """Time a training graph against the plain model and its stage-time limit."""
    from collabsurgery.measure.bench import BenchConfig, format_table, run_bench, to_json

    cfg = BenchConfig(_models(args.model), pattern=args.pattern,
                      graph_args=_graph_arguments(args), image_size=args.image_size,
                      batch_size=args.batch_size, precision=args.precision,
                      channels_last=args.channels_last, compile=args.compile,
                      modes=args.execution, checkpoint=args.checkpoint, repeats=args.repeats,
                      warmup=args.warmup, num_classes=args.num_classes, device=args.device,
                      threads=args.threads, clock=args.clock)
    log = (lambda s: None) if args.json else (lambda s: print(f"... {s}", file=sys.stderr))
    result = run_bench(cfg, log)
    print(to_json(result) if args.json else format_table(result))


class _IntermixedParser(_Parser):
    """A subcommand whose ``key=value`` positionals may follow its options
    (``reproduce STUDY --seeds 3 train.epochs=5``); plain argparse takes no positionals after
    an option once a ``nargs="*"`` positional has matched nothing."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixing:  # Python < 3.13 parses intermixed args by calling this again
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def cmd_reproduce(args: argparse.Namespace) -> None:
    """Run a paper study (rows x seeds), resuming what is done, and write its report; with
    --all every landed study in turn, then an index page of their reports."""
    from collabsurgery.studies import run_all, run_study

    overrides = list(args.overrides)
    if args.all and args.study is not None:
        if "=" not in args.study:
            raise UserError(f"--all runs every landed study: give a study name or --all, not "
                            f"both (got '{args.study}')")
        overrides.insert(0, args.study)  # with --all, the first key=value lands in `study`
    options = dict(seeds=args.seeds, budget=args.budget, root=args.dir, overrides=overrides,
                   max_runs=args.max_runs, threads=args.threads, jobs=args.jobs)
    if args.all:
        run_all(index=args.index, **options)
    elif args.study is None:
        raise UserError("give a study name, or --all for every landed study")
    elif args.index is not None:
        raise UserError("--index goes with --all (one study's report is DIR/<study>-<budget>/"
                        "report.md)")
    else:
        run_study(args.study, **options)


def _modes(text: str) -> tuple[str, ...]:
    from collabsurgery.graphs import EXECUTION_MODES

    modes = EXECUTION_MODES if text == "all" else tuple(m.strip() for m in text.split(","))
    bad = [m for m in modes if m not in EXECUTION_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown execution mode '{bad[0]}'; valid: "
                                         f"{', '.join(EXECUTION_MODES)} or all")
    return modes


def _model_command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("model", help="timm name (resnet50) or torchvision.<name>; for "
                   "--pattern peers several, comma-separated")
    p.add_argument("--input-size", type=_input_size, default=None, metavar="N",
                   help="square input size for tracing and costs (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classes of the model's classifier (default: the model's own)")
    return p


def _add_splits(sub: Any) -> None:
    p = _model_command(sub, "splits", "list the clean split points of a model")
    p.set_defaults(func=cmd_splits)


def _add_wrap(sub: Any) -> None:
    p = _model_command(sub, "wrap", "build a training graph and print what it costs")
    from collabsurgery.graphs import EXECUTION_MODES
    _add_graph_options(p)
    p.add_argument("--execution", choices=EXECUTION_MODES, default=None,
                   help="how sibling copies run (tree, instances); the printed costs are the "
                        "method's and do not depend on it")
    p.add_argument("--save", default=None, metavar="FILE",
                   help="also write the training graph (weights + arguments) to FILE")
    p.set_defaults(func=cmd_wrap)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="time a training graph against the plain model")
    p.add_argument("model", help="timm name (resnet50) or torchvision.<name>; for --pattern "
                   "peers several, comma-separated")
    _add_graph_options(p, skip=("checkpoint_branches",))  # bench's --checkpoint measures it
    p.add_argument("--image-size", type=_at_least(1), default=224, metavar="N",
                   help="square input size of the timed batches")
    p.add_argument("--batch-size", type=_at_least(1), default=16, metavar="N",
                   help="examples per timed step")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classes of the model's classifier (default: the model's own)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype (fp32: no autocast)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the plain model, and each stage's sibling group "
                        "(regional)")
    p.add_argument("--execution", type=_modes, default="all", metavar="MODES",
                   help="comma-separated execution modes (loop,fused,packed,auto) or all")
    p.add_argument("--checkpoint", action="store_true",
                   help="also measure each mode with activation checkpointing of branch stages "
                        "(+ckpt: recompute all; +sel: recompute all but convolutions and "
                        "matmuls)")
    p.add_argument("--repeats", type=_at_least(1), default=5, help="timed steps (median)")
    p.add_argument("--warmup", type=_at_least(0), default=2, help="untimed steps first")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--threads", type=_at_least(1), default=None, metavar="N",
                   help="CPU threads (torch.set_num_threads); 1 is steadiest on a shared machine")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="CPU timing: wall clock, or this process's CPU time (steadier when the "
                        "machine is shared; use with --threads 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_bench)


def _add_weights(p: argparse.ArgumentParser, verb: str) -> None:
    """--ema / --live: which of a run's weights (default: the run's train.ema_select)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ema", dest="weights", action="store_const", const="ema", default=None,
                       help=f"{verb} the EMA weights of a run trained with train.ema_decay "
                            "('best': the best EMA head on hold-out); default for runs with "
                            "train.ema_select: true")
    group.add_argument("--live", dest="weights", action="store_const", const="live",
                       help=f"{verb} the live (trained) weights; the default otherwise")


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export one head as a plain backbone (safetensors, a "
                       "timm folder, ONNX or torch.export)")
    p.add_argument("source", help="a training run directory or a training graph file")
    p.add_argument("--head", default=None,
                   help="head index, 'best' (best on hold-out), or for a peer group a student's "
                        "architecture (resnet18); default: the head the run's method keeps "
                        "(OKDDip: the leader, the last head; otherwise best)")
    p.add_argument("-o", "--output", required=True,
                   help="output .safetensors file (--format timm-folder: a new directory; "
                        "onnx: model.onnx and torch-export: model.pt2, in an existing folder)")
    p.add_argument("--format", choices=("safetensors", "timm-folder", "onnx", "torch-export"),
                   default="safetensors",
                   help="safetensors: one file for cs.load_backbone or timm's file overlay; "
                        "timm-folder: config.json + model.safetensors + README.md model card, "
                        "as timm's save_for_hf writes (timm.create_model('local-dir:DIR', "
                        "pretrained=True); pushable to the Hub); onnx: an ONNX file with a "
                        "dynamic batch and the preprocessing in its metadata (pip install "
                        "collabsurgery[onnx]); torch-export: a torch.export program "
                        "(torch.export.load). onnx and torch-export are verified against the "
                        "head's logits before they are kept")
    p.add_argument("--opset", type=_at_least(7), default=None, metavar="N",
                   help="--format onnx (or timm-folder --onnx): the ai.onnx opset (default: "
                        "the exporter's)")
    p.add_argument("--features-only", action="store_true",
                   help="--format onnx / torch-export: the feature maps (outputs features.<i>) "
                        "instead of the logits")
    p.add_argument("--onnx", action="store_true",
                   help="--format timm-folder: also model.onnx beside model.safetensors")
    _add_weights(p, "export")
    p.set_defaults(func=cmd_export)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="test accuracy of one head of a run; --perturb: under "
                       "Gaussian weight noise (paper 002, Fig. 6)")
    p.add_argument("run", help="a training run directory")
    p.add_argument("--head", default=None,
                   help="which head, as for export (default: the head the run's method keeps)")
    p.add_argument("--perturb", type=_sigmas, default=None, metavar="SIGMAS",
                   help="comma-separated standard deviations of the noise added to every "
                        "parameter, e.g. 0.01,0.02,0.05; writes robustness.json and "
                        "robustness.png into the run directory")
    p.add_argument("--draws", type=_at_least(1), default=5, metavar="N",
                   help="noise draws per sigma (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--exits", action="store_true",
                   help="a BYOT run: each exit's test accuracy and FLOPs beside the full "
                        "network's (anytime inference)")
    _add_weights(p, "evaluate")
    p.set_defaults(func=cmd_evaluate)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a recipe (also: accelerate launch tools/train.py)")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe keys to change, e.g. train.epochs=1 run.name=mine")
    _add_threads(p)
    p.set_defaults(func=cmd_train)


def _add_reproduce(sub: Any) -> None:
    p = sub.add_parser("reproduce", help="run a paper study (a grid of recipes over seeds, "
                       "resumable) and write report.md with plots")
    p.__class__ = _IntermixedParser  # options and key=value overrides in any order
    p.add_argument("study", nargs="?", default=None,
                   help="the study to run, e.g. clilr-table1 (an unknown name lists the valid "
                        "ones); leave it out with --all")
    p.add_argument("--all", action="store_true",
                   help="run every landed study with rows on the budget in turn, then write an "
                        "index page linking their reports with a verdict line each")
    p.add_argument("--index", default=None, metavar="PATH",
                   help="with --all: where the index page goes (default: DIR/index.md)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="runs per row, seeds 0..N-1 (default: the budget's, 5)")
    p.add_argument("--budget", choices=("small", "full"), default="small",
                   help="small: built-in digits, CPU-sized; full: paper 000's CIFAR-10 setting "
                        "(give data.source=...; clilr studies only)")
    p.add_argument("--dir", default="studies",
                   help="each study goes to DIR/<study>-<budget>/ (default: studies)")
    p.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="train at most N runs now, then report what is finished (0: report only)")
    p.add_argument("--threads", type=_at_least(1), default=None, metavar="N",
                   help="torch CPU threads (default: 1 without a GPU, steadiest on a shared "
                        "machine)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, each in its own process (on a CPU about cores / "
                        "threads, e.g. 2 on 2 cores; the results do not depend on it)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="for every run, e.g. data.source=/data/cifar10 train.epochs=50")
    p.set_defaults(func=cmd_reproduce)


def _add_finetune_detection(sub: Any) -> None:
    p = sub.add_parser("finetune-detection", help="fine-tune a Faster R-CNN (FPN) on an "
                       "exported backbone, with COCO mAP (also: accelerate launch "
                       "tools/finetune_detection.py)")
    from collabsurgery.detection import add_arguments as detection_arguments
    detection_arguments(p)
    p.set_defaults(func=cmd_finetune_detection)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="a method vs its single-model baseline on the built-in "
                       "digits (default CL-ILR), then export and reload the kept head")
    p.add_argument("--recipe", default=None,
                   help="a recipe, e.g. recipes/demo-dml.yaml (default: the built-in demo "
                        "settings, recipes/demo.yaml's)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe keys for both runs, e.g. train.epochs=3")
    _add_threads(p)
    p.set_defaults(func=cmd_demo)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_at_least(1), default=None, metavar="N",
                   help="torch CPU threads (default: PyTorch's, one per core; 1 is steadiest "
                        "on a shared machine)")


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` before any work (intra-op threads of this process)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


_COMMANDS = (_add_splits, _add_wrap, _add_bench, _add_export, _add_evaluate, _add_train,
             _add_reproduce, _add_finetune_detection, _add_demo)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every subcommand with its help line, and the options of
    ``command`` (None: of every subcommand)."""
    parser = _Parser(prog="collabsurgery", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = _OneCommand(parser.add_subparsers(dest="command", required=True,
                                            parser_class=_Parser), command)
    for add in _COMMANDS:
        try:
            add(sub)
        except _Skipped:
            pass
    return parser


def _one_line(err: BaseException) -> str:
    """The message of an error; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is ``<module>.<Type>: <message>``."""
    text = str(err).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _report(message: str) -> None:
    """Print one line on stderr, once per launch: from the first process of a multi-process
    run only (torchrun and accelerate set RANK), so N processes do not repeat it."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


#: extra arguments for every command, for quick trials and tests of documented commands:
#: ``key=value`` recipe overrides go after those of train, demo and reproduce (so they win);
#: ``detection.<option>=value`` become finetune-detection's ``--<option> value``
ENVIRONMENT_OVERRIDES = "COLLABSURGERY_OVERRIDES"


def _with_environment(argv: list[str], command: str) -> list[str]:
    """``argv`` with the arguments :data:`ENVIRONMENT_OVERRIDES` gives ``command`` (said on
    stderr when there are any)."""
    items = os.environ.get(ENVIRONMENT_OVERRIDES, "").split()
    if command in ("train", "demo", "reproduce"):
        extra = [item for item in items if not item.startswith("detection.")]
    elif command == "finetune-detection":
        extra = [part for item in items if item.startswith("detection.")
                 for part in (f"--{item[10:].split('=', 1)[0].replace('_', '-')}",
                              item.split("=", 1)[1] if "=" in item else "")]
    else:
        extra = []
    if extra and "-h" not in argv and "--help" not in argv:
        _report(f"collabsurgery: {ENVIRONMENT_OVERRIDES} adds: {' '.join(extra)}")
        return [*argv, *extra]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``collabsurgery`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # "": no command's options
    argv = _with_environment(argv, command)
    args = build_parser(command).parse_args(argv)
    try:
        _set_threads(args)
        args.func(args)
    except UserError as err:
        _report(f"collabsurgery: error: {_one_line(err)}")
        return 2
    except TrainingStopped as err:
        _report(f"collabsurgery: training stopped: {err}")
        return 1
    except Interrupted as err:
        _report(f"collabsurgery: {err}")
        return 130
    except KeyboardInterrupt:  # outside training: nothing to resume
        _report("collabsurgery: interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
