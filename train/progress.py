"""The progress bar: tqdm on process 0 with the latest loss, tokens/s, MFU and device memory.

Other processes get a bar that shows nothing; runs with progress=False on process 0 still print the messages
(`write`), without the bar. The loop has one code path either way.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """A bar over [start, total) steps; `update(step, **metrics)` moves it to `step` and shows the metrics."""

    def __init__(self, start: int, total: int, *, bar: bool, messages: bool):
        self._bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                         file=sys.stdout, disable=not bar, mininterval=0.5)
        self._messages = messages
        self._at = start

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None,
               mfu: float | None = None, mem_gib: float | None = None, **_) -> None:
        self._bar.update(step - self._at)
        self._at = step
        shown = {}
        if loss is not None:
            shown["loss"] = f"{loss:.3f}"
        if tokens_per_s is not None:
            shown["tok/s"] = f"{tokens_per_s:,.0f}"
        if mfu is not None:
            shown["mfu"] = f"{100 * mfu:.1f}%"
        if mem_gib is not None:
            shown["mem"] = f"{mem_gib:.1f}GiB"
        if shown:
            self._bar.set_postfix(shown, refresh=False)

    def write(self, message: str) -> None:
        """Prints a line above the bar (plainly when there is no bar)."""
        if self._bar.disable:
            if self._messages:
                print(message, flush=True)
        else:
            self._bar.write(message, file=sys.stdout)

    def close(self) -> None:
        self._bar.close()
