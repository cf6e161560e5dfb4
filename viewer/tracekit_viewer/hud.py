"""The words the window shows about itself: the status lines, the caption of rendered frames,
the mark of a step still being read and the one line of a read that failed.

Pure text from a frame, the state and the source (nothing is read here that the frame did
not read already); :mod:`tracekit_viewer.app` puts it into its text actors.
"""

from __future__ import annotations

from .frame import Frame
from .source import METRIC_TITLES, TraceSource
from .state import ViewState, head_label

__all__ = ["caption_text", "error_text", "loading_text", "model_label", "short_text",
           "status_text"]


def short_text(text: str, width: int = 10) -> str:
    """A token's text as a short, single-line label."""
    t = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return t if len(t) <= width else t[: width - 1] + "~"


def model_label(name: str) -> str:
    """A model's name for the status line: a local path shortened to its last two parts."""
    if name.startswith(("/", "~", ".")) or "\\" in name:
        parts = [p for p in name.replace("\\", "/").split("/") if p]
        return "/".join(parts[-2:])
    return name


def caption_text(source: TraceSource, frame: Frame) -> str:
    """The caption of a rendered frame: the step and the current token."""
    c = frame.city
    last = c.current.stop - 1
    return (f"step {c.step} / {c.n_steps - 1}   token {last} "
            f"{short_text(source.token_text(last), 24)!r}")


def status_text(source: TraceSource, state: ViewState, frame: Frame) -> str:
    """The window's status lines: what the frame shows and how the controls are set."""
    st, c = state, frame.city
    last = c.current.stop - 1
    text = source.token_text(last)
    lines = [
        f"{model_label(source.model_name)}   step {c.step} / {c.n_steps - 1}   "
        f"positions 0-{c.end - 1}   current token {last} {short_text(text, 24)!r}",
        f"height + colour: {METRIC_TITLES.get(c.metric, c.metric)}   arcs: "
        f"{head_label(st.heads)}, top-{st.top_k}, weight >= {st.threshold:.2f}   "
        f"{'playing' if st.playing else 'paused'} at {st.speed:g} steps/s",
    ]
    extra = []
    if st.focus is not None:
        extra.append(f"focus: floor L{source.floors[st.focus]}")
    if st.traced is not None:
        t = source.token_text(st.traced)
        extra.append(f"tracing token {st.traced} {short_text(t, 16)!r}" +
                     ("" if c.traced is not None else " (not computed yet)"))
    if c.start > 0:
        extra.append(f"showing the latest {c.n_cols} positions")
    if (c.groups > 1).any():
        extra.append(f"far floors merge {int(c.groups.max())} positions per box")
    if extra:
        lines.append("   ".join(extra))
    lines.append("h: help")
    return "\n".join(lines)


def loading_text(step: int, n_steps: int) -> str:
    """The mark shown while a step's data is read in the background."""
    return f"loading step {step} / {n_steps - 1}\u2026"


def error_text(step: int, message: str) -> str:
    """The one line shown when reading a step failed (the window stays up); the key to try
    again comes first, so that cutting a long message to the window's width keeps it."""
    return f"step {step} could not be read (r: try again): {message}"
