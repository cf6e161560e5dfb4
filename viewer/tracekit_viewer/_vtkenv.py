"""Choose how VTK opens its window before pyvista is imported.

Without a display (CI, SSH, containers) VTK's default X window fails with "bad X server
connection"; the EGL window renders off-screen on any Mesa/GPU driver instead. An explicit
``VTK_DEFAULT_OPENGL_WINDOW`` set by the user always wins.
"""

from __future__ import annotations

import os
import sys


def headless() -> bool:
    """True when there is no display to open a window on."""
    if sys.platform != "linux":
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def prepare(off_screen: bool) -> None:
    """Pick the EGL window for off-screen rendering on a machine without a display."""
    if off_screen and headless():
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
