"""``tracekit render`` and ``tracekit view`` through click's CliRunner, with exact output."""

from __future__ import annotations

import sys

import imageio.v3 as iio
import pytest
from click.testing import CliRunner

from tracekit.cli import main
from tracekit.view_cli import INSTALL_HINT


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_render_one_frame(exact_trace, tmp_path):
    out = tmp_path / "frame.png"
    result = run("render", exact_trace, "--step", "3", "--layer", "1", "--head", "0",
                 "--token", "2", "--view", "side", "--size", "160x120", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}\n"
    assert iio.imread(out).shape[:2] == (120, 160)


def test_render_a_gif_of_steps(exact_trace, tmp_path):
    out = tmp_path / "movie.gif"
    result = run("render", exact_trace, "--steps", "0:3", "--size", "120x90", "--no-panels",
                 "-o", str(out))
    assert result.output == f"wrote {out}\n"
    assert iio.imread(out, index=None).shape[0] == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--step", "9"], "Error: step out of range: the trace has steps 0..6\n"),
    (["--layer", "7"], "Error: layer 7 was not captured (captured: [0, 1, 2])\n"),
    (["--head", "2"], "Error: head 2 out of range: the model has heads 0..1\n"),
    (["--head", "most"], "Error: head must be 'mean', 'max' or a head index, not 'most'\n"),
    (["--token", "10"], "Error: token 10 out of range: the trace has positions 0..9\n"),
    (["--size", "big"], "Error: size must look like 960x720, not 'big'\n"),
    (["--steps", "0:2"], "Error: --steps writes a movie: use a .gif or .mp4 output, not "
                         "'x.png'\n"),
])
def test_render_errors_are_one_line(exact_trace, tmp_path, args, message):
    result = run("render", exact_trace, *args, "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert result.output == message


def test_a_movie_needs_a_movie_suffix_or_no_single_step(exact_trace, tmp_path):
    result = run("render", exact_trace, "--step", "1", "--steps", "0:2", "-o",
                 str(tmp_path / "m.gif"))
    assert result.output == "Error: use either --step (one image) or --steps (a movie)\n"


def test_without_the_viewer_installed_both_commands_say_how_to_get_it(exact_trace, tmp_path,
                                                                      monkeypatch):
    for name in [m for m in sys.modules if m.startswith("tracekit_viewer")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tracekit_viewer", None)  # import fails
    for args in (["view", exact_trace], ["render", exact_trace, "-o", str(tmp_path / "a.png")]):
        result = run(*args)
        assert result.exit_code == 1
        assert result.output == f"Error: {INSTALL_HINT}\n"
    assert "pip install -e viewer" in INSTALL_HINT and "pip install tracekit-viewer" in INSTALL_HINT


def test_help_lines():
    result = run("--help")
    lines = result.output.splitlines()
    assert "  render    Render a trace headless to a PNG, or --steps to a GIF/MP4." in lines
    assert "  view      Open a trace in the 3D viewer; press h there for the keys." in lines


def test_view_opens_the_viewer_with_the_options(exact_trace, monkeypatch):
    """``view`` builds the viewer from its options and runs it (the window is faked)."""
    from tracekit_viewer import _vtkenv, app

    seen = {}
    monkeypatch.setattr(_vtkenv, "headless", lambda: False)

    def fake_show(self):
        seen["state"] = self.state
        self.close()

    monkeypatch.setattr(app.CityViewer, "show", fake_show)
    monkeypatch.setattr(app.CityViewer, "__init__", _offscreen_init(app.CityViewer.__init__))
    result = run("view", exact_trace, "--step", "-2", "--layer", "2", "--head", "max",
                 "--token", "4", "--view", "top", "--metric", "mlp_out")
    assert result.exit_code == 0, result.output
    st = seen["state"]
    assert (st.step, st.focus, st.heads, st.traced, st.view, st.metric) == (
        5, 2, "max", 4, "top", "mlp_out")


def _offscreen_init(init):
    def wrapped(self, *args, **kwargs):
        kwargs.update(off_screen=True, window_size=(200, 150))
        init(self, *args, **kwargs)
    return wrapped


def test_view_without_a_display_points_to_render(exact_trace, monkeypatch):
    from tracekit_viewer import _vtkenv

    monkeypatch.setattr(_vtkenv, "headless", lambda: True)
    result = run("view", exact_trace)
    assert result.exit_code == 1
    assert result.output == ("Error: no display to open a window on (DISPLAY is not set); "
                             "write pictures with tracekit render instead\n")


def test_render_refuses_an_existing_output_unless_forced(exact_trace, tmp_path):
    out = tmp_path / "frame.png"
    out.write_bytes(b"keep me")
    result = run("render", exact_trace, "--size", "120x90", "-o", str(out))
    assert result.exit_code == 1
    assert result.output == f"Error: {out} already exists (pass --force to overwrite)\n"
    assert out.read_bytes() == b"keep me"
    result = run("render", exact_trace, "--size", "120x90", "--force", "-o", str(out))
    assert result.output == f"wrote {out}\n"
    assert iio.imread(out).shape[:2] == (90, 120)


@pytest.mark.parametrize("output", ["frame.png", "movie.gif"])
def test_an_empty_trace_renders_nothing_and_says_why(tmp_path, output):
    from tracekit_viewer.synthetic import write_synthetic_trace

    import tracekit

    full = write_synthetic_trace(tmp_path / "full.zarr", n_positions=4)
    with tracekit.open(full) as t:
        plan = t.plan
    empty = tmp_path / "empty.zarr"
    tracekit.create(empty, plan, prompt_length=2).close()
    result = run("render", str(empty), "-o", str(tmp_path / output))
    assert result.exit_code == 1
    assert result.output == "Error: the trace has no step recorded: nothing to show\n"
    assert not (tmp_path / output).exists()


def test_render_refuses_an_output_that_is_no_picture(exact_trace, tmp_path):
    out = tmp_path / "x.txt"
    result = run("render", exact_trace, "-o", str(out))
    assert result.exit_code == 1
    assert result.output == (f"Error: {out}: write a picture (.png, .jpg) or, with --steps, a "
                             f"movie (.gif, .mp4)\n")
    assert not out.exists()
