"""A progress display for :func:`~layerzero_serve.selection.tune_device`: a tqdm bar when tqdm
is installed, else a rich one, else one plain line per kernel; all on stderr."""

from __future__ import annotations

import sys


class TuneProgress:
    """``progress(done, total, label)`` for ``tune_device``: a tqdm bar if tqdm is installed,
    else a rich one, else one plain line per kernel; all on stderr, nothing when ``quiet``.
    Call ``close()`` when done.

    CUDA graphs: host only.
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar, self.close = quiet, None, lambda: None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = self._open(total)
        if self.bar == "plain":
            print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)
        else:
            self.bar(label)

    def _open(self, total: int):
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="tuning", unit="kernel", file=sys.stderr)
            self.close = bar.close
            return lambda label: (bar.set_postfix_str(label, refresh=False), bar.update(1))
        except ImportError:
            pass
        try:
            from rich.console import Console
            from rich.progress import Progress

            prog = Progress(console=Console(stderr=True))
            task = prog.add_task("tuning", total=total)
            prog.start()
            self.close = prog.stop
            return lambda label: prog.update(task, advance=1, description=label)
        except ImportError:
            return "plain"
