"""The real window: ``tracekit view`` in a subprocess on a virtual X display (Xvfb), driven
with xdotool through its real event loop (keys, playback timer, slider drag, hover, double
click, the screenshot key, quit). The viewer reports its state through the file named by
``TRACEKIT_VIEW_STATE``. Marked slow; skipped where Xvfb or xdotool is not installed
(``apt-get install xvfb xdotool``; ``.ci/run`` installs them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from .test_viewer_interaction import _box_centre, _display

pytestmark = [
    pytest.mark.slow,  # ~20 s: a window, a trace and a viewer process of its own
    pytest.mark.skipif(
        not (sys.platform == "linux" and shutil.which("Xvfb") and shutil.which("xdotool")),
        reason="needs Xvfb and xdotool"),
]

WIDTH, HEIGHT = 960, 640


@pytest.fixture
def display():
    """A fresh virtual X display; its number is chosen by Xvfb (-displayfd)."""
    read, write = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    assert number, "Xvfb did not start"
    yield f":{number}"
    proc.terminate()
    proc.wait(10)


class Window:
    """``tracekit view`` running on ``display``, and the means to drive and watch it."""

    def __init__(self, trace: str, display: str, workdir: Path) -> None:
        self.state_file = workdir / "state.json"
        self.env = {**os.environ, "DISPLAY": display, "TRACEKIT_VIEW_STATE": str(self.state_file),
                    # an off-screen window class left in the environment (as the test suite
                    # sets on a machine without a display) must not keep the window away
                    "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tracekit.cli import main; main()", "view", trace,
             "--size", f"{WIDTH}x{HEIGHT}"], cwd=workdir, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.xdotool("search", "--sync", "--onlyvisible", "--name", "tracekit view", timeout=90)
        self.xdotool("mousemove", str(WIDTH // 2), str(HEIGHT // 4))  # keys go where it points

    def xdotool(self, *args: str, timeout: float = 20) -> str:
        out = subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=True)
        return out.stdout

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def wait(self, what, timeout: float = 30.0) -> dict:
        """Poll the state file until ``what(state)`` holds."""
        deadline = time.monotonic() + timeout
        st: dict = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                st = self.state()
                if what(st):
                    return st
            assert self.proc.poll() is None, self.proc.stdout.read()
            time.sleep(0.05)
        raise AssertionError(f"timed out; last state {st}")

    def key(self, keysym: str, what) -> dict:
        self.xdotool("key", keysym)
        return self.wait(what)

    def screen(self, x: float, y: float) -> tuple[str, str]:
        """X screen coordinates (from the top) of a VTK display position (from the bottom);
        without a window manager the window sits at the screen's corner."""
        return str(int(round(x))), str(int(round(HEIGHT - 1 - y)))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def window(random_trace, display, tmp_path):
    w = Window(random_trace, display, tmp_path)
    yield w
    w.close()


def test_the_window_answers_keys_timer_slider_and_mouse(window, random_trace, tmp_path):
    w = window
    n = w.wait(lambda s: s["window_size"] == [WIDTH, HEIGHT])["step"] + 1  # opens at the end
    # keys from the help overlay
    w.key("Home", lambda s: s["step"] == 0)
    w.xdotool("key", "Right", "Right")
    w.wait(lambda s: s["step"] == 2)
    w.key("End", lambda s: s["step"] == n - 1)
    w.key("bracketright", lambda s: s["heads"] == "max")
    w.key("Up", lambda s: s["focus"] == 0)
    w.key("c", lambda s: s["metric"] == "attn_out")
    w.key("h", lambda s: s["help"])
    w.key("h", lambda s: not s["help"])
    w.key("Escape", lambda s: s["focus"] is None)
    # playback runs on the event loop's timer
    w.key("Home", lambda s: s["step"] == 0)
    w.key("space", lambda s: s["playing"])
    w.wait(lambda s: s["step"] >= 3)
    w.key("space", lambda s: not s["playing"])
    st = w.key("Home", lambda s: s["step"] == 0 and not s["playing"])

    # the step slider: a click on its track jumps there, then drag the knob further
    from tracekit_viewer.app import STEP_SLIDER

    (ax, ay), (bx, _) = STEP_SLIDER
    city_w, city_h, city_y0 = 0.6 * WIDTH, 0.6 * HEIGHT, 0.4 * HEIGHT  # weights 3:2

    def track(f: float) -> tuple[str, str]:
        return w.screen((ax + f * (bx - ax)) * city_w, city_y0 + ay * city_h)

    w.xdotool("mousemove", *track(0.25), "click", "1")
    w.wait(lambda s: abs(s["step"] - 0.25 * (n - 1)) <= 1)
    w.xdotool("mousemove", *track(0.25), "mousedown", "1")
    for f in (0.35, 0.45, 0.5):
        time.sleep(0.1)
        w.xdotool("mousemove", *track(f))
    w.xdotool("mouseup", "1")
    st = w.wait(lambda s: abs(s["step"] - 0.5 * (n - 1)) <= 1)

    # hover and double click a column: where it is drawn comes from an off-screen twin
    from tracekit_viewer.app import CityViewer
    from tracekit_viewer.state import ViewState

    fields = {k: st[k] for k in ("step", "metric", "heads", "focus", "traced", "view")}
    with CityViewer(random_trace, state=ViewState(**fields), off_screen=True,
                    window_size=(WIDTH, HEIGHT), prefetch=False) as twin:
        twin.screenshot()
        top = twin.source.n_floors - 1
        position = twin.frame.city.end - 3
        x, y = _display(twin.city_renderer, _box_centre(twin, top, position))
        expected = twin.pick(x, y)
    assert expected.position == position
    w.xdotool("mousemove", *w.screen(x, y))
    w.xdotool("mousemove", *w.screen(x + 1, y))
    w.wait(lambda s: s["hover"].startswith(f"token {position} "))
    w.xdotool("click", "--repeat", "2", "--delay", "80", "1")
    w.wait(lambda s: s["traced"] == position)

    # the screenshot key writes what the window shows; another camera shows something else
    w.key("s", lambda s: s.get("screenshot") == f"tracekit-view-step{st['step']}.png")
    w.key("1", lambda s: s["view"] == "front")
    w.key("s", lambda s: s.get("screenshot") == f"tracekit-view-step{st['step']}-1.png")
    first = iio.imread(tmp_path / f"tracekit-view-step{st['step']}.png")
    second = iio.imread(tmp_path / f"tracekit-view-step{st['step']}-1.png")
    assert first.shape[:2] == (HEIGHT, WIDTH)
    assert first.std() > 10  # not a blank window
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 1

    w.xdotool("key", "q")
    assert w.proc.wait(30) == 0
    assert w.state()["quit"]
    out = w.proc.stdout.read()
    assert f"wrote tracekit-view-step{st['step']}.png" in out
    assert "ERROR" not in out and "WARN" not in out, out
