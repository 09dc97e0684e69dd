"""Progress display that suits where it goes: bars on a terminal, none in a file or a pipe.

A tqdm bar redraws itself with carriage returns; where its stream is a log file or a pipe
(``make demo > log 2>&1``, a batch job) every redraw stays, thousands of frames per run. There
the trainer's own line per epoch is the progress display.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["bars"]


def bars(progress: bool = True, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: asked for (``progress``, off with ``--no-progress``) and
    ``stream`` (tqdm's, standard error) is a terminal, or this is a notebook (where tqdm draws
    widgets).

    Example:
        >>> import io
        >>> bars(True, io.StringIO()), bars(False, io.StringIO())
        (False, False)
    """
    if not progress:
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules
