"""Sweep timm and torchvision models: wrap 2 heads, train step, export, strict load, same logits.

    python tools/sweep_models.py                          # smallest model of each timm family
                                                          # and every torchvision classifier
    python tools/sweep_models.py --filter 'resnet*,vit_*' --all --max-params 30 --jobs 2
    python tools/sweep_models.py --no-timm --csv tv.csv --summary tv.md
    python tools/sweep_models.py --onnx                   # + the ONNX stage after each pass
    python tools/sweep_models.py --onnx-only              # only the reduced ONNX check

Each model is checked by :func:`collabsurgery.measure.sweep.check_model` in its own subprocess
(``python -m collabsurgery.measure.sweep NAME``), killed after ``--timeout`` seconds. The CSV is rewritten
after every model; the Markdown summary at the end. Ctrl-C kills the running checks and writes
what is done. The CSV's ``seconds`` is each subprocess's wall time (interpreter start and
imports included), as the timeout counts it.

``--onnx`` adds the ONNX stage (the head exported to ONNX and run by onnxruntime) after each
pass; a timeout in it keeps the model's result and marks only ``onnx`` as ``timeout``.
``--onnx-only`` runs the reduced ONNX check alone
(:func:`collabsurgery.measure.sweep.check_onnx_only`: each model with random weights at its
default input size, nothing wrapped or trained), for when the whole sweep with ONNX is too long
for the machine.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from collabsurgery.common.atomic import write_text
from collabsurgery.measure.sweep import (CSV_COLUMNS, RESULT_PREFIX, STAGE_PREFIX, SweepResult,
                                         candidate_models, default_models, family_of, library_of,
                                         summarise)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", action="append", default=[], metavar="PATTERN",
                        help="fnmatch pattern(s) on model names; repeatable or comma-separated "
                             "(torchvision models match as torchvision.NAME or NAME)")
    parser.add_argument("--max-params", type=float, default=None, metavar="M",
                        help="only models with at most M million parameters")
    parser.add_argument("--all", action="store_true",
                        help="every timm model, not only the smallest of each family")
    parser.add_argument("--no-timm", action="store_true", help="no timm models")
    parser.add_argument("--no-torchvision", action="store_true", help="no torchvision models")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="models checked in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    onnx = parser.add_mutually_exclusive_group()
    onnx.add_argument("--onnx", action="store_true",
                      help="add the ONNX stage after each pass (needs collabsurgery[onnx])")
    onnx.add_argument("--onnx-only", action="store_true",
                      help="only the reduced ONNX check of each model (random weights, default "
                           "input size; nothing wrapped or trained)")
    parser.add_argument("--csv", default="sweep.csv", metavar="PATH")
    parser.add_argument("--summary", default="sweep.md", metavar="PATH")
    args = parser.parse_args(argv)
    args.filter = [p.strip() for item in args.filter for p in item.split(",") if p.strip()]
    if args.jobs < 1 or args.threads < 1 or args.timeout <= 0:
        parser.error("--jobs and --threads must be >= 1 and --timeout > 0")
    return args


@dataclass
class Child:
    """A running check: the model's position, its process, and the file of its output."""

    index: int
    name: str
    params_m: float | None
    proc: subprocess.Popen
    log: IO[bytes]
    start: float = field(default_factory=time.monotonic)


def start_child(index: int, name: str, params_m: float | None, threads: int,
                flags: tuple[str, ...] = ()) -> Child:
    """Start ``python -m collabsurgery.measure.sweep NAME`` in a session of its own (so Ctrl-C reaches
    only this tool, which then kills the whole session)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "collabsurgery.measure.sweep", name,
                             "--threads", str(threads), *flags], stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return Child(index, name, params_m, proc, log)


def kill(child: Child) -> None:
    """Kill the child's whole process group and reap it."""
    try:
        os.killpg(child.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.proc.wait()


def collect(child: Child, timed_out: bool, timeout: float) -> SweepResult:
    """The child's result line; or a result made from its output when it has none."""
    child.log.seek(0)
    lines = child.log.read().decode(errors="replace").splitlines()
    child.log.close()
    seconds = round(time.monotonic() - child.start, 2)
    stages = [line[len(STAGE_PREFIX):] for line in lines if line.startswith(STAGE_PREFIX)]
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            result = SweepResult.from_json(line[len(RESULT_PREFIX):])
            if not result.onnx and stages[-1:] == ["onnx"]:  # stopped in the ONNX stage
                result.onnx = "timeout" if timed_out else "fail"
                result.onnx_reason = f"no result after {timeout:g} s" if timed_out else \
                    f"check process exited with status {child.proc.returncode}"
            result.seconds = seconds
            return result
    result = SweepResult(model=child.name, library=library_of(child.name),
                         params_m=child.params_m, stage=stages[-1] if stages else "create",
                         seconds=seconds)
    try:
        result.family = family_of(child.name)
    except Exception:  # noqa: BLE001 - an unknown name: the reason says so
        pass
    if timed_out:
        result.status, result.reason = "timeout", f"no result after {timeout:g} s"
    else:
        last = next((ln.strip() for ln in reversed(lines)
                     if ln.strip() and not ln.startswith(STAGE_PREFIX)), "no output")
        result.reason = f"check process exited with status {child.proc.returncode}: {last[:200]}"
    return result


def progress_line(done: int, total: int, result: SweepResult) -> str:
    """``[12/97] resnet18  pass  3.1s``, with stage and reason when it did not pass."""
    line = f"[{done}/{total}] {result.model}  {result.status}  {result.seconds:.1f}s"
    if result.status != "pass":
        line += f"  {result.stage}: {result.reason[:120]}"
    return line


def run_all(models: list[tuple[str, float | None]], args: argparse.Namespace,
            results: dict[int, SweepResult]) -> None:
    """Check every model, ``args.jobs`` at a time, filling ``results`` (by position) and
    rewriting the CSV as each finishes. On Ctrl-C the running checks are killed."""
    pending = list(enumerate(models))
    running: list[Child] = []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                index, (name, params_m) = pending.pop(0)
                running.append(start_child(index, name, params_m, args.threads,
                                           child_flags(args)))
            time.sleep(0.1)
            for child in list(running):
                timed_out = time.monotonic() - child.start > args.timeout
                if child.proc.poll() is None and not timed_out:
                    continue
                if timed_out:
                    kill(child)
                running.remove(child)
                result = collect(child, timed_out, args.timeout)
                results[child.index] = result
                print(progress_line(len(results), len(models), result), flush=True)
                write_csv(args.csv, ordered(results))
    finally:
        for child in running:
            kill(child)
            child.log.close()


def child_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The check's options passed on to each child."""
    return ("--onnx",) if args.onnx else ("--onnx-only",) if args.onnx_only else ()


def ordered(results: dict[int, SweepResult]) -> list[SweepResult]:
    """Results in the order the models were listed."""
    return [results[i] for i in sorted(results)]


def write_csv(path: str, results: list[SweepResult]) -> None:
    """The results as CSV (:data:`~collabsurgery.measure.sweep.CSV_COLUMNS`), written atomically."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow(result.csv_row())
    write_text(path, out.getvalue())


def select(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """The models to sweep, with their parameter counts where they were needed."""
    names = candidate_models(args.filter, timm_models=not args.no_timm,
                             torchvision_models=not args.no_torchvision)
    print(f"choosing among {len(names)} models ...", file=sys.stderr, flush=True)
    return default_models(names, max_params_m=args.max_params, every=args.all)


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the sweep as Ctrl-C does (children killed, results so far written)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; 0 when it ran to the end (whatever the models did), 130 when stopped by
    Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    command = shlex.join(["python", "tools/sweep_models.py",
                          *(sys.argv[1:] if argv is None else argv)])
    results: dict[int, SweepResult] = {}
    status, note = 0, ""
    try:
        models = select(args)
        print(f"sweeping {len(models)} models, {args.jobs} at a time", flush=True)
        run_all(models, args, results)
    except KeyboardInterrupt:
        status, note = 130, f"\n**Interrupted** after {len(results)} models.\n"
        print(f"interrupted; writing the {len(results)} results so far", file=sys.stderr)
    write_csv(args.csv, ordered(results))
    write_text(args.summary, summarise(ordered(results), command, onnx_only=args.onnx_only)
               + "\n" + note)
    print(f"wrote {args.csv} and {args.summary}")
    return status


if __name__ == "__main__":
    sys.exit(main())
