"""The exceptions the CLI turns into one line and an exit code, and :func:`warn`.

Every layer may import this module; it imports nothing from collabsurgery.
"""
import sys


class UserError(ValueError):
    """A bad model name, split point, recipe key, data path, ... given by the user.

    The message is one line that says what was wrong and what is valid. The CLI prints it
    without a traceback and exits with status 2; library callers get an ordinary ValueError.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty
    (for quoting a library's error inside one line of our own)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept.

    The CLI prints the message on one line and exits with status 1.
    """


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during training: the message says where to resume from.

    The CLI prints it on one line and exits with status 130, as shells do for SIGINT.
    """


class ArgumentError(UserError):
    """A bad value for one named argument of a graph builder or an objective.

    ``str(err)`` reads ``"<argument> <problem>"``; the engine re-words it as the recipe key
    (``recipe key 'graph.heads' must be ...``), so a recipe error names its key.
    """

    def __init__(self, argument: str, problem: str):
        super().__init__(f"{argument} {problem}")
        self.argument = argument
        self.problem = problem


def warn(message: str) -> None:
    """One line on stderr, from the main process only (every rank may call it)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"collabsurgery: {message}", file=sys.stderr)
