"""Every fenced code block of README.md runs, so the README cannot drift from the code.

Blocks are found anew at each run, so a block added later is tested too. Each block runs in a
fresh folder holding ``demo.zarr`` and ``demo.h5`` (the main job's demo recording) and
``trace.zarr`` (the demo sample, 64 steps); an output a command writes (``-o``) is removed
first. ``python`` blocks are executed; ``bash`` blocks are split into commands (continued
lines joined, ``&&`` chains split) and each command is

* run: ``tracekit`` commands in this process through click (fast), others with bash;
* run under ``-m slow``: movies (``render --steps`` or a .gif/.mp4 output), and commands that
  need a shell (``$(...)``, pipes, redirections: a bash subprocess imports torch again);
* or deliberately not run, by the rules of :data:`NOT_RUN`, each with a cheaper check instead:
  installs (``pip install``), the test suite itself, benchmarks (GPU or minutes long), hub ids
  (a download), ``tracekit view`` (a window). Their ``tracekit`` options are still parsed by
  the CLI, other programs must exist, and a benchmark's ``--help`` must work.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tracekit_viewer")

from tracekit.cli import main  # noqa: E402

# Render off-screen through EGL on machines without a display (before VTK makes a window).
if sys.platform == "linux" and not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_FEATURES = re.compile(r"\$\(|`|\||[<>]")
#: A hub id where a model goes: two names joined by a slash, or a bare known hub name.
HUB_ID = re.compile(r"^([\w.-]+/[\w.-]+|gpt2[\w-]*)$")


@dataclass(frozen=True)
class Command:
    text: str  #: as written, continuation lines joined
    words: tuple[str, ...]
    line: int  #: README line of its block

    @property
    def program(self) -> str:
        return self.words[0] if self.words else ""

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def _not_run_reason(c: Command) -> str | None:
    """Why a command is deliberately not run here (None: it runs)."""
    w = c.words
    joined = " ".join(w)
    if "pip install" in joined or c.program == "pip":
        return "installs packages"
    if w[:3] == ("python", "-m", "pytest") or c.program == "pytest":
        return "the test suite itself"
    if any(x.startswith("benchmarks/") for x in w):
        return "a benchmark (GPU, or minutes long)"
    if w[:2] == ("tracekit", "view"):
        return "opens a window"
    if w[:2] == ("tracekit", "record") and len(w) > 2 and HUB_ID.match(w[2]):
        return "downloads a model from the hub"
    return None


NOT_RUN = ("installs packages", "the test suite itself", "a benchmark (GPU, or minutes long)",
           "opens a window", "downloads a model from the hub")


def _slow(c: Command) -> bool:
    movie = c.words[:2] == ("tracekit", "render") and (
        "--steps" in c.words or any(w.endswith((".gif", ".mp4")) for w in c.words))
    return movie or bool(SHELL_FEATURES.search(c.text))


def blocks() -> list[tuple[str, str, int]]:
    """(language, code, line) of every fenced block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def commands(code: str, line: int) -> list[Command]:
    out = []
    for logical in code.replace("\\\n", " ").splitlines():
        words = shlex.split(logical, comments=True)
        text = logical.split(" #")[0].strip() if "#" in logical else logical.strip()
        parts: list[list[str]] = [[]]
        for w in words:
            if w == "&&":
                parts.append([])
            else:
                parts[-1].append(w)
        texts = [t.strip() for t in text.split("&&")]
        out += [Command(t, tuple(p), line) for t, p in zip(texts, parts, strict=True) if p]
    return out


PYTHON_BLOCKS = [(code, line) for lang, code, line in blocks() if lang in ("python", "py")]
BASH_COMMANDS = [c for lang, code, line in blocks() if lang in ("bash", "sh", "shell", "console")
                 for c in commands(code, line)]
UNTESTED = [(lang, line) for lang, _, line in blocks()
            if lang not in ("python", "py", "bash", "sh", "shell", "console", "text", "")]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """demo.zarr / demo.h5 as the main job records them, and a 64-step trace.zarr."""
    folder = tmp_path_factory.mktemp("readme-fixtures")
    result = CliRunner().invoke(main, ["record", "--prompt", "def fibonacci(n):",
                                       "--max-new-tokens", "24", "-o", str(folder / "demo.zarr")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["convert", str(folder / "demo.zarr"),
                                       str(folder / "demo.h5")])
    assert result.exit_code == 0, result.output
    shutil.copytree(ROOT / "sample_traces" / "demo_fibonacci.zarr", folder / "trace.zarr")
    return folder


@pytest.fixture
def workdir(fixtures: Path, tmp_path: Path, monkeypatch) -> Path:
    for item in fixtures.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, tmp_path / item.name)
    os.symlink(ROOT / "sample_traces", tmp_path / "sample_traces")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_blocks_of_each_kind() -> None:
    assert len(PYTHON_BLOCKS) >= 3 and len(BASH_COMMANDS) >= 10
    assert UNTESTED == [], "a README block in a language this test does not run"


@pytest.mark.parametrize(("code", "line"), PYTHON_BLOCKS,
                         ids=[f"line{line}" for _, line in PYTHON_BLOCKS])
def test_python_block_runs(code: str, line: int, workdir: Path, capsys) -> None:
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})  # noqa: S102


def _outputs(c: Command) -> list[str]:
    return [c.words[i + 1] for i, w in enumerate(c.words[:-1])
            if w in ("-o", "--out", "--output")]


def _run(c: Command, folder: Path) -> None:
    for out in _outputs(c):
        target = folder / out
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    if c.program == "tracekit" and not SHELL_FEATURES.search(c.text):
        result = CliRunner().invoke(main, list(c.words[1:]))
        assert result.exit_code == 0, f"{c}\n{result.output}"
    else:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                     f"{os.environ.get('PATH', '')}"}
        done = subprocess.run(["bash", "-c", c.text], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{c}\n{done.stdout}{done.stderr}"
    for out in _outputs(c):
        assert (folder / out).exists(), f"{c} did not write {out}"


def _check_not_run(c: Command, folder: Path) -> None:
    """The cheaper check of a command that is not run: its syntax and its program."""
    assert subprocess.run(["bash", "-n", "-c", c.text]).returncode == 0, c
    if c.program == "tracekit":
        command = main.commands[c.words[1]]
        with command.make_context(c.words[1], list(c.words[2:])):  # options parse
            pass
    elif any(w.startswith("benchmarks/") for w in c.words):
        script = next(w for w in c.words if w.startswith("benchmarks/"))
        done = subprocess.run([sys.executable, str(ROOT / script), "--help"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{c}\n{done.stderr}"
    else:
        assert shutil.which(c.program) or c.program == "python", c
        for i, w in enumerate(c.words[:-1]):  # editable installs name folders of this repo
            if w == "-e":
                target = c.words[i + 1].split("[")[0].strip("\"'")
                assert (ROOT / target).is_dir(), f"{c}: no folder {target}"


def _marks(c: Command) -> list:
    return [pytest.mark.slow] if _slow(c) and _not_run_reason(c) is None else []


@pytest.mark.parametrize("command", [pytest.param(c, marks=_marks(c)) for c in BASH_COMMANDS],
                         ids=[f"line{c.line}-" + "-".join(c.words[:3]).strip("-")
                              for c in BASH_COMMANDS])
def test_bash_command_runs(command: Command, workdir: Path) -> None:
    reason = _not_run_reason(command)
    if reason is None:
        _run(command, workdir)
        return
    assert reason in NOT_RUN
    _check_not_run(command, workdir)


def test_the_rules_leave_the_main_job_to_run() -> None:
    """The rules do not skip what the README promises works offline."""
    ran = {c.words[:2] for c in BASH_COMMANDS if _not_run_reason(c) is None}
    assert {("tracekit", "record"), ("tracekit", "render"), ("tracekit", "replay")} <= ran
