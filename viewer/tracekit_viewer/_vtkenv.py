"""Choose how VTK opens its window before a render window is created.

Without a display (CI, SSH, containers) VTK's default X window fails with "bad X server
connection"; the EGL window renders off-screen on any Mesa/GPU driver instead. An explicit
``VTK_DEFAULT_OPENGL_WINDOW`` set by the user wins for off-screen rendering; an interactive
window on a display always uses the X window (an EGL or OSMesa window cannot show one, and VTK
would only warn and return at once).
"""

from __future__ import annotations

import os
import sys

#: Window classes that render off-screen only.
OFF_SCREEN_WINDOWS = ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow")


def headless() -> bool:
    """True when there is no display to open a window on."""
    if sys.platform != "linux":
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def prepare(off_screen: bool) -> None:
    """Pick the EGL window for off-screen rendering on a machine without a display, and the
    X window for an interactive one (VTK reads the variable whenever it creates a window)."""
    if off_screen:
        if headless():
            os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    elif (sys.platform == "linux" and os.environ.get("DISPLAY")
          and os.environ.get("VTK_DEFAULT_OPENGL_WINDOW") in OFF_SCREEN_WINDOWS):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkXOpenGLRenderWindow"
