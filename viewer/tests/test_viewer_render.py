"""Off-screen rendering: image regression against small reference PNGs, and the frame and
movie writers behind ``tracekit render``.

The references in ``reference/`` were rendered here (VTK 9.7, Mesa llvmpipe through EGL).
After an intended visual change, regenerate them and look at them before committing::

    TRACEKIT_UPDATE_REFERENCES=1 pytest viewer/tests/test_viewer_render.py
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from tracekit_viewer.app import CityViewer
from tracekit_viewer.render import parse_size, parse_steps, render_frame, render_movie
from tracekit_viewer.state import ViewState
from tracekit_viewer.synthetic import write_synthetic_trace

REFERENCE_DIR = Path(__file__).parent / "reference"
UPDATE = os.environ.get("TRACEKIT_UPDATE_REFERENCES") == "1"
SIZE = (320, 240)
MEAN_TOLERANCE = 2.0  # mean absolute difference per channel, 0..255
PIXEL_TOLERANCE = 0.01  # fraction of pixels allowed to differ by more than 48 levels


def image_difference(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference, fraction of clearly different pixels)."""
    d = np.abs(actual[..., :3].astype(np.int16) - expected[..., :3].astype(np.int16))
    return float(d.mean()), float((d.max(axis=-1) > 48).mean())


def check_image(name: str, image: np.ndarray, tmp_path: Path) -> None:
    path = REFERENCE_DIR / f"{name}.png"
    if UPDATE:
        REFERENCE_DIR.mkdir(exist_ok=True)
        iio.imwrite(path, image)
        return
    if not path.exists():
        pytest.fail(f"no reference image {path}; create it with TRACEKIT_UPDATE_REFERENCES=1")
    expected = iio.imread(path)
    assert image.shape[:2] == expected.shape[:2]
    mean, frac = image_difference(image, expected)
    if mean > MEAN_TOLERANCE or frac > PIXEL_TOLERANCE:
        out = tmp_path / f"{name}-actual.png"
        iio.imwrite(out, image)
        pytest.fail(f"{name}: differs from its reference (mean {mean:.2f} levels, "
                    f"{frac:.2%} of pixels); this render is {out}")


def render(trace: str, panels: bool, controls: bool = False, **state) -> np.ndarray:
    """A frame as ``tracekit render`` draws it, or (``controls``) as the window shows it."""
    with CityViewer(trace, state=ViewState(**state), off_screen=True, window_size=SIZE,
                    panels=panels, prefetch=False, controls=controls) as v:
        return v.screenshot()


CASES = {
    "city-iso-last-step": dict(panels=False, step=6),
    "city-front-focus-trace-mlp": dict(panels=False, step=5, view="front", focus=1, traced=2,
                                       heads=0, metric="mlp_out"),
    "panels-step3-traced": dict(panels=True, step=3, traced=1, heads=1, focus=2),
    # the interactive window: play button, sliders, status line
    "window-panels-step3-traced": dict(panels=True, controls=True, step=3, traced=1, heads=1,
                                       focus=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_render_matches_reference(exact_trace, name, tmp_path):
    case = dict(CASES[name])
    image = render(exact_trace, case.pop("panels"), **case)
    assert image.shape == (SIZE[1], SIZE[0], 3)
    check_image(name, image, tmp_path)


def test_the_comparison_notices_a_different_frame(exact_trace):
    """The tolerance must not swallow a real change: another step is not the same picture."""
    ref = REFERENCE_DIR / "city-iso-last-step.png"
    if UPDATE or not ref.exists():
        pytest.skip("references are being regenerated")
    other = render(exact_trace, False, step=1)
    mean, frac = image_difference(other, iio.imread(ref))
    assert mean > MEAN_TOLERANCE or frac > PIXEL_TOLERANCE


def controls_on_screen(v: CityViewer) -> list[str]:
    """What of the window's controls a render of ``v`` would show: enabled widgets, and
    visible text anchored to a viewport (not a label in the scene) other than the caption."""
    import vtk

    owner = getattr(v.plotter, "widgets", v.plotter)  # (older PyVista: on the plotter)
    shown = [f"widget {type(w).__name__}" for w in (*owner.slider_widgets,
                                                   *owner.button_widgets) if w.GetEnabled()]
    for ren in v.plotter.renderers:
        props = ren.GetViewProps()
        for i in range(props.GetNumberOfItems()):
            actor = props.GetItemAsObject(i)
            if (isinstance(actor, vtk.vtkTextActor) and actor.GetVisibility()
                    and actor is not v.caption and actor.GetInput()
                    and actor.GetPositionCoordinate().GetCoordinateSystem()
                    != vtk.VTK_WORLD):
                title = any(actor is t for t in getattr(v, "panel_titles", {}).values())
                if not title:
                    shown.append(f"text {actor.GetInput()!r}")
    return shown


def test_rendered_frames_and_movies_show_no_controls(exact_trace, tmp_path, monkeypatch):
    """No play button, slider, status ("paused at 4 steps/s"), hover or help text in what
    ``render_frame`` and ``render_movie`` write; a caption names the step and token."""
    seen: list[tuple[list[str], str]] = []
    screenshot = CityViewer.screenshot

    def spy(self: CityViewer) -> np.ndarray:
        caption = self.caption.GetInput() if self.caption.GetVisibility() else ""
        seen.append((controls_on_screen(self), caption))
        return screenshot(self)

    monkeypatch.setattr(CityViewer, "screenshot", spy)
    render_frame(exact_trace, tmp_path / "f.png", size=SIZE, step=3, token=1)
    render_movie(exact_trace, tmp_path / "m.gif", steps="4:6", size=SIZE)
    render_movie(exact_trace, tmp_path / "c.gif", steps="5:6", size=SIZE, panels=False)
    assert [shown for shown, _ in seen] == [[], [], [], []]
    # step 3 adds position 6 (4 prompt tokens, then one a step): the current token
    assert [c.split("   ")[0] for _, c in seen] == ["step 3 / 6", "step 4 / 6", "step 5 / 6",
                                                  "step 5 / 6"]
    assert seen[0][1].startswith("step 3 / 6   token 6 ")


def test_the_window_keeps_its_controls(viewer):
    """The interactive viewer (the ``viewer`` fixture) still shows what renders leave out."""
    shown = controls_on_screen(viewer)
    assert sum(s.startswith("widget") for s in shown) == 3  # play, step, threshold
    assert any("paused at" in s and "h: help" in s for s in shown)
    assert not viewer.caption.GetVisibility()


def test_render_frame_writes_a_png_of_the_requested_size(exact_trace, tmp_path):
    out = render_frame(exact_trace, tmp_path / "f.png", size=(200, 150), step=-1, layer=1,
                       head="max", token=3, view="top")
    image = iio.imread(out)
    assert image.shape[:2] == (150, 200)
    assert image[..., :3].std() > 5  # not a blank frame


def test_render_movie_gif_has_one_frame_per_step(exact_trace, tmp_path):
    out = render_movie(exact_trace, tmp_path / "m.gif", steps="1:4", size=(160, 120),
                       panels=False)
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (3, 120, 160)
    assert not np.array_equal(frames[0], frames[2])  # the city grows


def test_render_movie_mp4(exact_trace, tmp_path):
    out = render_movie(exact_trace, tmp_path / "m.mp4", steps=":", size=(161, 121), fps=8)
    frames = iio.imread(out, index=None, plugin="pyav") if _has_pyav() else None
    assert out.stat().st_size > 1000
    if frames is not None:
        assert frames.shape[0] == 7


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_trace_with_tokens_only_still_renders(tmp_path):
    path = write_synthetic_trace(tmp_path / "tokens.h5", n_layers=2, n_positions=5, d_model=8,
                                 n_heads=2, captured=())
    image = render(str(path), True, step=1, traced=0)
    assert image.shape == (SIZE[1], SIZE[0], 3)


def test_parse_options():
    assert parse_size("960x720") == (960, 720)
    assert parse_steps("2:5", 10) == range(2, 5)
    assert parse_steps(":", 3) == range(0, 3)
    assert parse_steps("-2:", 10) == range(8, 10)
    for bad in ("960", "0x10"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("3", "a:b", "5:2"):
        with pytest.raises(ValueError):
            parse_steps(bad, 10)


def test_the_vtk_message_guard_sees_vtk_errors():
    """The guard every test runs under really catches what VTK reports."""
    import vtk

    from .conftest import VtkMessages

    with VtkMessages() as watch:
        reader = vtk.vtkXMLPolyDataReader()
        reader.SetFileName("/no/such/file.vtp")
        reader.Update()
    assert any("Error opening file" in m for m in watch.messages)
