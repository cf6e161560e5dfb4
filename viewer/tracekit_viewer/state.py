"""What the viewer is showing: one small, plain state object and the keyboard map.

Every control (slider, key, pick, command-line option) changes a :class:`ViewState`; every
view is recomputed from it, so all four views always follow the same step, layer, head and
token, and scrubbing backwards is exactly as correct as forwards (nothing is accumulated).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["KEYMAP", "SPEEDS", "VIEWS", "ViewState", "cycle_heads", "head_label"]

VIEWS = ("iso", "front", "side", "top")
SPEEDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # steps per second
METRIC_ORDER = ("residual", "attn_out", "mlp_out")


@dataclass
class ViewState:
    """The complete state of the viewer (positions and floors are indices, not labels)."""

    step: int = 0
    metric: str = "residual"
    heads: str | int = "mean"  # "mean", "max" or a head index
    focus: int | None = None  # focused floor (index into the captured layers)
    traced: int | None = None  # traced token position
    top_k: int = 2
    threshold: float = 0.15
    show_arcs: bool = True
    show_columns: bool = True
    show_links: bool = True
    show_labels: bool = True
    view: str = "iso"
    playing: bool = False
    speed: float = 4.0
    help: bool = False

    def copy(self, **changes: object) -> ViewState:
        return replace(self, **changes)  # type: ignore[arg-type]


def cycle_heads(heads: str | int, n_heads: int, delta: int = 1) -> str | int:
    """Next head selection in the cycle mean -> max -> head 0 -> ... -> head n-1 -> mean."""
    order: list[str | int] = ["mean", "max", *range(n_heads)]
    i = order.index(heads) if heads in order else 0
    return order[(i + delta) % len(order)]


def head_label(heads: str | int) -> str:
    return f"head {heads}" if isinstance(heads, int) else f"{heads} over heads"


def cycle(values: tuple, current: object, delta: int = 1) -> object:
    i = values.index(current) if current in values else 0
    return values[(i + delta) % len(values)]


def next_speed(speed: float, delta: int) -> float:
    """The next speed in :data:`SPEEDS` up (delta > 0) or down, clamped."""
    i = min(range(len(SPEEDS)), key=lambda j: abs(SPEEDS[j] - speed))
    return SPEEDS[max(0, min(len(SPEEDS) - 1, i + delta))]


#: (key symbol, what it does, action name). The help overlay is generated from this table.
KEYMAP: tuple[tuple[str, str, str], ...] = (
    ("space", "play / pause", "toggle_play"),
    ("Right", "next step", "step_forward"),
    ("Left", "previous step", "step_back"),
    ("Home", "first step", "first_step"),
    ("End", "last step", "last_step"),
    ("equal", "faster", "faster"),
    ("plus", "faster", "faster"),
    ("minus", "slower", "slower"),
    ("Up", "focus the floor above", "focus_up"),
    ("Down", "focus the floor below", "focus_down"),
    ("f", "focus the floor under the mouse (again: unfocus)", "focus_under_mouse"),
    ("p", "trace the token under the mouse (also: double click)", "trace_under_mouse"),
    ("bracketright", "next head: mean, max, 0, 1, ...", "next_head"),
    ("bracketleft", "previous head", "prev_head"),
    ("c", "colour by: residual / attention out / MLP out", "next_metric"),
    ("k", "more arcs per token (top-k + 1)", "more_arcs"),
    ("j", "fewer arcs per token (top-k - 1)", "fewer_arcs"),
    ("period", "raise the arc threshold", "raise_threshold"),
    ("comma", "lower the arc threshold", "lower_threshold"),
    ("a", "toggle attention arcs", "toggle_arcs"),
    ("b", "toggle token columns (buildings)", "toggle_columns"),
    ("l", "toggle residual links", "toggle_links"),
    ("n", "toggle token labels", "toggle_labels"),
    ("1", "camera: front", "view_front"),
    ("2", "camera: side", "view_side"),
    ("3", "camera: top", "view_top"),
    ("0", "camera: three-quarter", "view_iso"),
    ("Escape", "clear focus and tracing", "clear"),
    ("s", "save a screenshot (PNG, current folder)", "save_screenshot"),
    ("r", "read the step again (after a read error)", "retry"),
    ("h", "show / hide this help", "toggle_help"),
    ("question", "show / hide this help", "toggle_help"),
    ("q", "quit", "quit"),
)


def help_text() -> str:
    """The help overlay: one line per key, from :data:`KEYMAP`."""
    names = {"space": "Space", "Right": "Right", "Left": "Left", "Up": "Up", "Down": "Down",
             "equal": "+", "plus": "+", "minus": "-", "bracketright": "]",
             "bracketleft": "[", "period": ".", "comma": ",", "question": "?", "Escape": "Esc"}
    seen: set[str] = set()
    lines = ["Keys"]
    for sym, what, action in KEYMAP:
        label = names.get(sym, sym)
        if (label, action) in seen or sym in ("plus", "question"):
            continue
        seen.add(label)
        lines.append(f"{label:>6}  {what}")
    lines.append("mouse: drag rotates, wheel zooms, hover shows values")
    return "\n".join(lines)
