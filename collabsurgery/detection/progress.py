"""Progress of a fine-tuning epoch: a tqdm bar on a terminal, plain lines elsewhere.

tqdm draws nothing when stderr is not a terminal (output to a file, a pipe, a batch job), so a
long epoch would be silent; there, :class:`StepProgress` prints one line on stderr at the first
step, then at most every ``every`` seconds, and at the last step::

    collabsurgery: epoch 1/2, step 40/125: loss 1.2345 (3.6 s/step, about 306 s left)
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class StepProgress:
    """Steps of one epoch; ``show`` False (other processes) prints nothing."""

    def __init__(self, epoch: int, epochs: int, steps: int, every: float, show: bool = True):
        self.label = f"epoch {epoch}/{epochs}"
        self.steps, self.every, self.done = steps, every, 0
        self.lines = show and not sys.stderr.isatty()
        self.bar = tqdm(total=steps, desc=self.label, leave=False,
                        disable=True if not show or self.lines else None)
        self.started = self.last = time.perf_counter()

    def step(self, loss: float) -> None:
        """One step done with this loss."""
        self.done += 1
        self.bar.update()
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        now = time.perf_counter()
        if self.lines and (self.done in (1, self.steps) or now - self.last >= self.every):
            self.last = now
            pace = (now - self.started) / self.done
            print(f"collabsurgery: {self.label}, step {self.done}/{self.steps}: loss {loss:.4f} "
                  f"({pace:.2g} s/step, about {pace * (self.steps - self.done):.0f} s left)",
                  file=sys.stderr, flush=True)

    def tick(self) -> None:
        """One step done, shown on the bar only (evaluation: no loss to report)."""
        self.bar.update()

    def say(self, message: str) -> None:
        """A line off a terminal only (on one the bar shows progress)."""
        if self.lines:
            print(f"collabsurgery: {self.label}: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the bar."""
        self.bar.close()
