"""Drive the viewer the way a user does: slider, keys, buttons, picks and hovers on an
off-screen plotter, and check what every view shows afterwards."""

from __future__ import annotations

import numpy as np
import pytest
from tracekit_viewer.synthetic import WORDS, exact_attention, exact_residual_norm


def _display(renderer, xyz) -> tuple[int, int]:
    """Pixel position of a world point in a renderer."""
    renderer.SetWorldPoint(*xyz, 1.0)
    renderer.WorldToDisplay()
    x, y, _ = renderer.GetDisplayPoint()
    return int(round(x)), int(round(y))


def _box_centre(viewer, floor: int, position: int) -> tuple[float, float, float]:
    fr = viewer.frame.city
    lay = viewer.layout
    floors, first, _ = viewer._boxes
    box = int(np.flatnonzero((floors == floor) & (first == position - fr.start))[0])
    corners = np.asarray(viewer.columns.points).reshape(-1, 8, 3)[box]
    assert lay  # (the box is wherever the geometry put it)
    return tuple(corners.mean(axis=0))


def test_step_slider_moves_every_view(viewer):
    slider = viewer.step_slider
    slider.GetRepresentation().SetValue(2)
    slider.InvokeEvent("InteractionEvent")
    assert viewer.state.step == 2
    fr = viewer.frame
    assert (fr.city.end, fr.city.current) == (6, range(5, 6))
    assert fr.attention.queries == range(0, 6) and fr.attention.current == range(5, 6)
    assert fr.layer.positions == range(0, 6)
    assert fr.token.position == 5  # nothing traced: the current token
    assert "step 2 / 6" in viewer.status.GetInput()
    # backwards, to the prompt step
    slider.GetRepresentation().SetValue(0)
    slider.InvokeEvent("InteractionEvent")
    assert viewer.frame.city.end == 4 and viewer.frame.city.current == range(0, 4)


def test_stepping_with_keys_and_the_slider_follows(viewer):
    viewer.press("Home")
    assert viewer.state.step == 0
    viewer.press("Right")
    viewer.press("Right")
    assert viewer.state.step == 2
    assert viewer.step_slider.GetRepresentation().GetValue() == 2
    viewer.press("Left")
    assert viewer.state.step == 1
    viewer.press("End")
    assert viewer.state.step == 6
    viewer.press("Right")  # clamps at the end
    assert viewer.state.step == 6


def test_play_pause_speed_and_timer(viewer):
    viewer.press("Home")
    viewer.press("space")
    assert viewer.state.playing
    viewer.press("equal")
    assert viewer.state.speed == 8.0
    viewer.press("minus")
    viewer.press("minus")
    assert viewer.state.speed == 2.0
    t0 = viewer._last_tick
    assert not viewer.tick(now=t0 + 0.4)  # 0.8 steps due: not yet
    assert viewer.tick(now=t0 + 1.0)  # 2 steps per second
    assert viewer.state.step == 2
    assert viewer.tick(now=t0 + 10.0)  # past the end: stops on the last step
    assert viewer.state.step == 6 and not viewer.state.playing
    # the play button starts again from the beginning
    rep = viewer.play_button.GetRepresentation()
    rep.SetState(1)
    viewer.play_button.InvokeEvent("StateChangedEvent")
    assert viewer.state.playing and viewer.state.step == 0
    viewer.press("space")
    assert not viewer.state.playing and rep.GetState() == 0


def test_heads_metric_and_arc_filters_from_keys(viewer):
    viewer.press("bracketright")
    assert viewer.state.heads == "max"
    viewer.press("bracketright")
    assert viewer.state.heads == 0 and viewer.frame.attention.heads == 0
    assert "head 0" in viewer.panel_titles["attention"].GetInput()
    viewer.press("bracketleft")
    assert viewer.state.heads == "max"
    viewer.press("c")
    assert viewer.state.metric == "attn_out"
    assert viewer.frame.city.values[2].tolist() == [1.5] * 10  # |attn_out| = 0.5 (layer + 1)
    assert viewer.scalar_bar.GetTitle() == "attention out norm"
    lo, hi = viewer.scalar_bar.GetLookupTable().GetRange()
    assert (lo, hi) == (0.5, 1.5)
    viewer.press("c")
    viewer.press("c")
    assert viewer.state.metric == "residual"
    n = len(viewer.frame.city.arcs)
    viewer.press("k")
    assert viewer.state.top_k == 3 and len(viewer.frame.city.arcs) >= n
    viewer.press("j")
    viewer.press("j")
    assert viewer.state.top_k == 1
    viewer.press("period")
    assert viewer.state.threshold == pytest.approx(0.2)
    viewer.press("comma")
    viewer.press("comma")
    assert viewer.state.threshold == pytest.approx(0.1)


def test_threshold_slider_filters_arcs(viewer):
    slider = viewer.threshold_slider
    slider.GetRepresentation().SetValue(0.45)
    slider.InvokeEvent("InteractionEvent")
    assert viewer.state.threshold == pytest.approx(0.45)
    arcs = viewer.frame.city.arcs
    assert len(arcs) and (arcs.weight >= 0.45).all()


def test_toggles_hide_and_show_actors(viewer):
    labels = viewer.token_labels.actors[:viewer.token_labels.count] + viewer.floor_labels.actors
    for key, actors in (("a", viewer.arc_actors), ("b", [viewer.columns_actor]),
                        ("l", [viewer.links_actor]), ("n", labels)):
        viewer.press(key)
        assert not any(a.GetVisibility() for a in actors), key
        viewer.press(key)
        assert all(a.GetVisibility() for a in actors), key
    viewer.press("h")
    assert viewer.help_overlay.GetVisibility()
    assert "Space  play / pause" in viewer.help_overlay.GetInput()
    viewer.press("h")
    assert not viewer.help_overlay.GetVisibility()


def test_camera_presets_and_layer_focus(viewer):
    cam = viewer.city_renderer.GetActiveCamera()
    viewer.press("1")
    d = np.subtract(cam.GetPosition(), cam.GetFocalPoint())
    assert abs(d[1]) > 10 * (abs(d[0]) + abs(d[2]))  # front: looking along +y
    viewer.press("3")
    d = np.subtract(cam.GetPosition(), cam.GetFocalPoint())
    assert d[2] > 10 * (abs(d[0]) + abs(d[1]))  # top: looking down
    viewer.press("2")
    assert viewer.state.view == "side"
    viewer.press("0")
    before = np.linalg.norm(np.subtract(cam.GetPosition(), cam.GetFocalPoint()))
    viewer.press("Up")  # focus the bottom floor: zoom in, fade the others
    assert viewer.state.focus == 0 and viewer.frame.layer.floor == 0
    assert np.linalg.norm(np.subtract(cam.GetPosition(), cam.GetFocalPoint())) < before
    assert cam.GetFocalPoint()[2] == pytest.approx(viewer.layout.max_height / 2)
    alpha = np.asarray(viewer.columns.point_data["rgba"])[:, 3].reshape(-1, 8)[:, 0]
    floors = viewer._boxes[0]
    visible = alpha > 0
    assert (alpha[(floors == 0) & visible] == 255).all()
    assert (alpha[(floors != 0) & visible] < 60).all()
    viewer.press("Up")
    assert viewer.state.focus == 1 and viewer.frame.attention.floor == 1
    viewer.press("Escape")
    assert viewer.state.focus is None


def test_pick_a_column_shows_its_exact_values_and_traces_it(viewer):
    viewer.press("1")  # front view: every box visible
    viewer.screenshot()
    xy = _display(viewer.city_renderer, _box_centre(viewer, floor=1, position=6))
    info = viewer.pick(*xy)
    assert (info.kind, info.position, info.floor) == ("column", 6, 1)
    assert info.value == exact_residual_norm(6, 2)
    assert repr(WORDS[6]) in info.text and "residual norm 4 " in info.text
    # hover shows the same in the hover line
    assert viewer.hover(*xy).position == 6
    assert repr(WORDS[6]) in viewer.hover_text.GetInput()
    # 'p' traces the token under the mouse: every view follows it
    viewer._mouse = xy
    viewer.press("p")
    assert viewer.state.traced == 6
    fr = viewer.frame
    assert fr.city.traced == 6 and fr.token.traced and fr.token.position == 6
    assert fr.attention.traced == 6
    assert viewer.tracer_actor.GetVisibility()
    tracer_x = np.asarray(viewer.tracer.points)[:, 0].mean()
    assert tracer_x == pytest.approx(6 * viewer.layout.spacing)
    # the traced token's arcs are marked: it attends to token 0 on every floor
    arcs = fr.city.arcs
    assert {(int(q), int(k)) for q, k, kind in zip(arcs.query, arcs.key, arcs.kind,
                                                  strict=True) if kind == 2} >= {(6, 0)}
    # 'f' focuses the floor under the mouse, again unfocuses
    viewer.press("f")
    assert viewer.state.focus == 1
    viewer.screenshot()  # the camera zoomed to the floor: find the column again
    viewer._mouse = _display(viewer.city_renderer, _box_centre(viewer, floor=1, position=6))
    viewer.press("f")
    assert viewer.state.focus is None


def test_pick_attention_and_layer_cells(viewer):
    viewer.set_state(heads=1, focus=2)
    viewer.screenshot()
    ren = viewer.panel_renderers["attention"]
    # cell (query 7, key 0): head 1 puts a quarter on the first token
    info = viewer.pick(*_display(ren, (0.5, -7.5, 0.0)))
    assert (info.kind, info.position, info.key) == ("attention", 7, 0)
    assert info.value == exact_attention(7, 2, 1)[0] == 0.25
    assert "0.2500" in info.text
    info = viewer.pick(*_display(ren, (7.5, -7.5, 0.0)))
    assert info.key == 7 and info.value == 0.75
    ren = viewer.panel_renderers["layer"]
    # position 3's residual after L2 is one-hot on dim (3 + point index 3) % 8
    col = viewer.frame.layer.dims.tolist().index(6)
    info = viewer.pick(*_display(ren, (col + 0.5, -3.5, 0.0)))
    assert (info.kind, info.position, info.key) == ("layer", 3, 6)
    assert info.value == exact_residual_norm(3, 3)


def test_pick_an_arc(viewer):
    viewer.set_state(view="front", heads=0, threshold=0.3, top_k=1)
    viewer.screenshot()
    arcs = viewer.frame.city.arcs
    i = int(np.flatnonzero((arcs.floor == 0) & (arcs.query == 9))[0])
    from tracekit_viewer.scene import arc_points, floor_z

    lay = viewer.layout
    geom = arc_points(np.array([arcs.key[i] * lay.spacing]),
                      np.array([arcs.query[i] * lay.spacing]),
                      floor_z(3, lay)[[0]], lay)[0]
    mid = geom[len(geom) // 2]
    info = viewer.pick(*_display(viewer.city_renderer, tuple(mid)))
    assert (info.kind, info.position, info.key, info.floor) == ("arc", 9, 0, 0)
    assert info.value == 0.5 and "weight 0.5000" in info.text


def test_bad_state_is_refused(viewer):
    with pytest.raises(ValueError):
        viewer.set_state(heads=5)
    with pytest.raises(ValueError):
        viewer.set_state(focus=3)
    with pytest.raises(ValueError):
        viewer.set_state(traced=10)


def test_scrubbing_updates_meshes_in_place(viewer):
    """A frame copies new numbers into the same meshes: no actor is created or replaced."""
    ren = viewer.city_renderer
    props = ren.GetViewProps().GetNumberOfItems()
    columns, mesh = viewer.columns_actor, viewer.columns
    for step in (0, 6, 3, 1):
        viewer.set_step(step)
        viewer.screenshot()
    assert ren.GetViewProps().GetNumberOfItems() == props
    assert viewer.columns_actor is columns and columns.mapper.dataset is mesh
    # the level of detail did not change, so neither did the number of boxes
    assert mesh.n_cells == 6 * 3 * 10


def test_a_traced_token_scrolled_out_of_the_window(exact_trace):
    """With only the latest 4 positions shown, token 1 is traced but not in the city."""
    from tracekit_viewer.app import CityViewer
    from tracekit_viewer.scene import CityLayout
    from tracekit_viewer.state import ViewState

    with CityViewer(exact_trace, state=ViewState(step=6, traced=1), layout=CityLayout(window=4),
                    off_screen=True, window_size=(320, 240), prefetch=False) as v:
        v.screenshot()
        assert v.frame.city.start == 6 and v.frame.token.position == 1
        assert not v.tracer_actor.GetVisibility()
        v.set_step(0)  # scrub back: it is in the window again
        v.screenshot()
        assert v.tracer_actor.GetVisibility()


def test_help_overlay_is_aligned_and_drawn_above_the_labels(viewer):
    viewer.press("h")
    lines = viewer.help_overlay.GetInput().splitlines()
    assert len({len(line) for line in lines}) == 1  # padded: centred as a block
    assert any(line.strip().startswith("s  save a screenshot") for line in lines)
    viewer.set_state(traced=3)  # may add label actors: the help stays the last overlay
    props = viewer.city_renderer.GetViewProps()
    assert props.GetItemAsObject(props.GetNumberOfItems() - 1) is viewer.help_overlay


def test_screenshot_key_and_state_file(viewer, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRACEKIT_VIEW_STATE", str(tmp_path / "state.json"))
    viewer.press("Home")
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 0
    viewer.press("s")
    viewer.press("s")
    assert capsys.readouterr().out == ("wrote tracekit-view-step0.png\n"
                                       "wrote tracekit-view-step0-1.png\n")
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "tracekit-view-step0.png").shape == (480, 640, 3)
    st = json.loads((tmp_path / "state.json").read_text())
    assert st["screenshot"] == "tracekit-view-step0-1.png" and st["window_size"] == [640, 480]
    assert viewer.hover_text.GetInput() == "saved tracekit-view-step0-1.png"


def test_a_new_window_size_refits_the_panels_and_moves_the_play_button(viewer):
    before = viewer.play_button_bounds
    keys = dict(viewer._panel_keys)
    viewer.plotter.window_size = (800, 640)
    viewer.plotter.iren.interactor.InvokeEvent("ConfigureEvent")
    assert viewer.play_button_bounds != before
    assert viewer._panel_keys != keys
    x0, x1, y0, y1 = viewer.play_button_bounds
    assert x1 < 0.10 * 0.6 * 800  # left of the step slider's track
    assert y0 < 0.06 * 0.6 * 640 < y1  # at its height


def test_an_interactive_window_never_uses_an_off_screen_window_class(monkeypatch):
    import os

    from tracekit_viewer import _vtkenv

    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    _vtkenv.prepare(off_screen=True)  # off-screen: the user's choice stands
    assert os.environ["VTK_DEFAULT_OPENGL_WINDOW"] == "vtkEGLRenderWindow"
    _vtkenv.prepare(off_screen=False)
    assert os.environ["VTK_DEFAULT_OPENGL_WINDOW"] == "vtkXOpenGLRenderWindow"
    monkeypatch.delenv("DISPLAY")
    monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW")
    _vtkenv.prepare(off_screen=True)  # no display: EGL
    assert os.environ["VTK_DEFAULT_OPENGL_WINDOW"] == "vtkEGLRenderWindow"


def test_arc_meshes_keep_their_cells_while_scrubbing(viewer):
    """Arcs live in meshes with room to spare: a frame rewrites points and colours, the
    lines past the ones shown are transparent, and the cells are not rebuilt."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    lines = viewer._arc_lines
    cells = [p.mesh.GetLines() for p in lines]
    for step in (6, 0, 3, 6):
        viewer.set_step(step)
        viewer.screenshot()
        assert [p.mesh.GetLines() for p in lines] == cells
        drawn = sum(p.count for p in lines)
        assert drawn == len(viewer.frame.city.arcs)
        for p in lines:
            alpha = vtk_to_numpy(p.mesh.GetPointData().GetArray("rgba"))[:, 3]
            assert (alpha.reshape(p.capacity, p.length)[p.count:] == 0).all()
    boxes, points, n_lines = viewer.scene_size()
    assert boxes == 3 * 10 and n_lines == drawn + viewer._link_lines.count
