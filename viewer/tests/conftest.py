"""Fixtures of the viewer tests: small synthetic traces, an off-screen viewer, and a guard
that fails any test during which VTK reports an error or a warning.

``viewer/tests`` is a package (it has an ``__init__.py``) so that this module is imported as
``tests.conftest``: ``pytest`` at the repository root also collects ``tests/``, whose modules
``from conftest import ...`` their own conftest, which a second top-level ``conftest`` module
would shadow.
"""

from __future__ import annotations

import os
import sys

# Render off-screen through EGL on machines without a display (must precede any VTK window).
if sys.platform == "linux" and not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import pytest  # noqa: E402
from tracekit_viewer.synthetic import write_synthetic_trace  # noqa: E402

SMALL = (320, 240)


class VtkMessages:
    """Collects VTK errors and warnings while active (nested use is allowed: the innermost
    collector sees the messages)."""

    def __init__(self) -> None:
        import pyvista as pv

        self._catcher = pv.VtkErrorCatcher(raise_errors=False, send_to_logging=False)

    def __enter__(self) -> VtkMessages:
        self._catcher.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)

    @property
    def messages(self) -> list[str]:
        return [str(e) for e in self._catcher.events]


@pytest.fixture(autouse=True)
def fail_on_vtk_messages():
    """Any VTK error or warning during a test fails it."""
    with VtkMessages() as watch:
        yield watch
    if watch.messages:
        pytest.fail("VTK reported:\n" + "\n".join(watch.messages), pytrace=False)


@pytest.fixture(scope="session")
def exact_trace(tmp_path_factory) -> str:
    """3 floors, 10 positions (a 4-token prompt, then 6 single-token steps), 2 heads; every
    value is given by ``tracekit_viewer.synthetic.exact_*``."""
    path = tmp_path_factory.mktemp("traces") / "exact.zarr"
    return str(write_synthetic_trace(path, n_layers=3, n_positions=10, d_model=8, n_heads=2,
                                     prompt_length=4, values="exact"))


@pytest.fixture(scope="session")
def exact_trace_h5(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("traces") / "exact.h5"
    return str(write_synthetic_trace(path, n_layers=3, n_positions=10, d_model=8, n_heads=2,
                                     prompt_length=4, values="exact"))


@pytest.fixture(scope="session")
def random_trace(tmp_path_factory) -> str:
    """6 floors, 40 positions, 4 heads of plausible-looking random activations."""
    path = tmp_path_factory.mktemp("traces") / "random.zarr"
    return str(write_synthetic_trace(path, n_layers=6, n_positions=40, d_model=64, n_heads=4,
                                     prompt_length=6, values="random", seed=1))


@pytest.fixture
def viewer(exact_trace):
    """An off-screen 2x2 viewer of the exact trace at its last step."""
    from tracekit_viewer.app import CityViewer

    v = CityViewer(exact_trace, off_screen=True, window_size=(640, 480), prefetch=False)
    v.screenshot()  # first render: cameras and widgets are in place
    yield v
    v.close()
