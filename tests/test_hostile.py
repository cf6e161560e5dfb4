"""Hostile traces through the command line: ``info`` and ``validate`` end within seconds,
under a 4 GiB address-space limit, with one printable line (the corpus in
``tests/corruption.py`` holds the cases; here is what the CLI makes of them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tracegen
from click.testing import CliRunner
from corruption import ALL_CASES, edit_json, edit_meta, make_sources, materialize, write_chunk

from tracekit.cli import main
from tracekit.errors import MAX_MESSAGE_CHARS

LIMIT = 4 << 30
TIMEOUT_S = 60


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """``tracekit ARGS`` in a child under RLIMIT_AS and a timeout: (result, its peak RSS).

    The child reports its own peak (``VmHWM`` at exit, on a last stderr line that is taken
    off ``result.stderr``): ``getrusage``'s peaks count what a child had before ``exec``, a
    copy of this test process, and the parent's ``RUSAGE_CHILDREN`` is the peak of every
    child it ever waited for, other tests' included."""
    code = (f"import atexit, os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}));"
            "atexit.register(lambda: os.write(2, ('\\n' + RSS_MARK + [l.split()[1] for l in "
            "open('/proc/self/status') if l.startswith('VmHWM:')][0] + '\\n').encode()));"
            "from tracekit.cli import main; sys.argv = ['tracekit', *sys.argv[1:]];"
            "main(standalone_mode=True)").replace("RSS_MARK", repr(RSS_MARK))
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    text, _, peak = result.stderr.rstrip("\n").rpartition(RSS_MARK)
    assert peak.strip().isdigit(), f"the child reported no peak RSS: {result.stderr[-500:]}"
    result.stderr = text.rstrip("\n") + ("\n" if text.strip() else "")
    return result, int(peak) * 1024


#: Marks the line on which a child started by run_cli reports its peak RSS (KiB).
RSS_MARK = "tracekit-test-peak-rss-kib="


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return make_sources(tmp_path_factory.mktemp("valid"), 11)


HOSTILE = [c for c in ALL_CASES if any(word in c.name for word in (
    "link", "fifo", "budget", "bomb", "chunk-key", "data-type", "codec-", "version-unicode",
    "surrogate", "message-quotes"))]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_the_cli_answers_a_hostile_trace_with_one_line(case, sources, tmp_path) -> None:
    path = materialize(case, sources, tmp_path / "work")
    runner = CliRunner()
    for command in ("info", "validate"):
        result = runner.invoke(main, [command, str(path)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            command, result.exception)
        if command == "info" and result.exit_code == 0:
            continue  # the damage is in data info does not read (validate must see it)
        assert result.exit_code != 0, (command, result.output)
        lines = result.output.strip("\n").split("\n")
        assert command == "validate" or len(lines) == 1, result.output
        for line in lines:
            assert line.isprintable(), (command, line)
            assert len(line) <= MAX_MESSAGE_CHARS + len(f"Error: {path}: "), line


def _millions_of_positions(path: Path) -> None:
    """A few hundred KB that declare 2^20 positions of 4 kB tokens (4.3 GB): every dimension
    within its limit, the chunk files absent (read as zeros)."""
    n, width = 1 << 20, 4096
    edit_meta(path, lambda m: (m.update(status="recording"), m.pop("length", None),
                               m["capture"].update(max_positions=n, token_bytes=width)))
    for folder in path.iterdir():
        if not (folder / "zarr.json").exists():
            continue
        meta = json.loads((folder / "zarr.json").read_text())
        dims = meta["dimension_names"]
        if dims[0] not in ("position", "step", "key", "byte") and "byte" not in dims:
            continue
        shape = [n if d in ("position", "step", "key") else width if d == "byte" else s
                 for d, s in zip(dims, meta["shape"], strict=True)]
        chunks = [*meta["chunk_grid"]["configuration"]["chunk_shape"][:1], *shape[1:]]
        edit_json(folder / "zarr.json", lambda a, shape=shape, chunks=chunks: (
            a.update(shape=shape), a["chunk_grid"]["configuration"].update(chunk_shape=chunks)))
        for chunk in tracegen.chunk_files(path, folder.name):
            chunk.unlink()
    edit_json(path / "zarr.json", lambda r: r.update(consolidated_metadata=None))
    commit = tracegen.chunk_files(path, "commit")[0]
    write_chunk(commit, np.array([n, 1], "<i8").tobytes())


def test_info_allocates_nothing_in_proportion_to_declared_shapes(tmp_path) -> None:
    path = tmp_path / "t.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(captured=[]), seed=3)
    _millions_of_positions(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 400_000
    result, rss = run_cli("info", str(path))
    assert result.returncode == 0, result.stderr
    assert "position 1048576" in result.stdout
    assert rss < 1 << 30, f"info reached {rss / 1e9:.1f} GB"
    result, rss = run_cli("validate", str(path))
    assert result.returncode == 1 and len(result.stderr.strip().split("\n")) >= 1
    assert "Traceback" not in result.stderr, result.stderr
    assert rss < 1 << 30, f"validate reached {rss / 1e9:.1f} GB"


CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from click.testing import CliRunner
from tracekit.cli import main
for path in sys.argv[1:]:
    for command in ("info", "validate"):
        start = time.monotonic()
        result = CliRunner().invoke(main, [command, path])
        exc = result.exception
        bad = None if exc is None or isinstance(exc, SystemExit) else repr(exc)[:300]
        print(json.dumps({{"path": path, "command": command, "error": bad,
                          "seconds": time.monotonic() - start}}), flush=True)
"""


def test_every_hostile_case_ends_within_seconds_under_4_gib(sources, tmp_path) -> None:
    """All hostile corpus cases through ``info`` and ``validate`` in one child process
    limited to 4 GiB of address space: no exception, no case over 10 s."""
    paths = [str(materialize(case, sources, tmp_path / case.name)) for case in HOSTILE]
    result = subprocess.run([sys.executable, "-c", CHILD.format(limit=LIMIT), *paths],
                            capture_output=True, text=True, timeout=20 * len(paths))
    assert result.returncode == 0, result.stderr[-2000:]
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(runs) == 2 * len(paths)
    for run in runs:
        assert run["error"] is None, run
        assert run["seconds"] < 10, run
