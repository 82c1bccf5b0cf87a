"""Find what to export: a training graph file, or the last checkpoint of a training run."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .export import export
from .graphfile import load_graph


def parse_head(text: str, num_heads: int) -> int | None:
    """``"best"`` -> None; an index -> int in range; anything else a UserError."""
    if text == "best":
        return None
    try:
        head = int(text)
    except ValueError:
        head = -1
    if not 0 <= head < num_heads:
        raise UserError(f"head '{text}' out of range; valid: best or 0..{num_heads - 1}")
    return head


def export_from_source(source: Path, head_text: str, output: Path) -> tuple[Path, int]:
    """Export ``head_text`` of ``source`` to ``output``; returns (path, head index)."""
    if source.is_dir():
        raise UserError(f"{source} is a directory but not a training run (no recipe.yaml)")
    if not source.is_file():
        raise UserError(f"no such file or run directory: {source}")
    net = load_graph(source)
    head = parse_head(head_text, net.num_heads)
    if head is None:
        raise UserError("head 'best' needs a training run with hold-out metrics; "
                        f"give a head index 0..{net.num_heads - 1}")
    return export(net, head, output), head
