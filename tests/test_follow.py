"""Following a recording in progress with ``Trace.refresh()``: positions appear as they are
committed, and the final status (``complete``, ``aborted``) shows once the writer finishes."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest
import tracegen
from click.testing import CliRunner
from conftest import DISK_BACKENDS, SUFFIX

import tracekit
from tracekit.cli import main


@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_refresh_follows_a_recording_until_it_is_complete(tmp_path, kind) -> None:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tracekit", "tracegen"])
    path = tmp_path / f"live{SUFFIX[kind]}"
    plan = tracegen.kill_plan()
    started = ctx.Event()
    writer = ctx.Process(target=tracegen.record_in_child, args=(str(path), 3, started),
                         kwargs={"step_pause": 0.15}, daemon=True)
    writer.start()
    try:
        assert started.wait(60)
        deadline = time.monotonic() + 60
        while not path.exists():  # it appears once laid out, under its final name
            assert time.monotonic() < deadline, "the trace never appeared"
            time.sleep(0.01)
        seen: list[tuple[str, int]] = []
        with tracekit.open(path) as trace:
            seen.append((trace.status, trace.n_positions))
            while trace.status == "recording":
                assert time.monotonic() < deadline, f"still recording after 60 s: {seen[-3:]}"
                time.sleep(0.02)
                n = trace.refresh()
                assert n == trace.n_positions
                seen.append((trace.status, n))
                if trace.status == "recording" and n:  # what is committed reads back exact
                    assert len(trace["residual"]) == n
            assert trace.complete and trace.n_positions == plan.max_positions
            assert trace.metadata["length"] == {"positions": plan.max_positions,
                                                "steps": trace.n_steps}
            tracegen.assert_trace_matches(trace, tracegen.expected_contents(
                plan, 3, plan.max_positions))
    finally:
        writer.join(60)
    counts = [n for _, n in seen]
    assert counts == sorted(counts), seen  # never goes back
    midway = {n for status, n in seen if status == "recording" and 0 < n < plan.max_positions}
    assert len(midway) >= 2, f"no progress seen while recording: {seen}"


def test_refresh_reports_an_aborted_recording_and_why(tmp_path, monkeypatch) -> None:
    plan = tracegen.small_plan()
    path = tmp_path / "t.zarr"
    writer = tracegen.create_synthetic(path, plan, 4, commit_interval=0.0)
    sizes = tracegen.step_sizes(4, plan.max_positions)
    first = int(np.cumsum(sizes)[2])
    tracegen.feed_synthetic(writer, plan, 4, first, sizes[:3])
    writer.flush()
    with tracekit.open(path) as trace:
        assert (trace.status, trace.n_positions) == ("recording", first)

        def no_space(*args, **kwargs):
            raise OSError(28, "No space left on device")

        # The disk fills: the next commit's data cannot be written.
        monkeypatch.setattr(type(writer._arrays["residual"]), "write_rows", no_space)
        # One more step, then a flush: its commit fails, whatever the threads' timing.
        ids, texts, arrays, t = list(tracegen.iter_steps(plan, 4, plan.max_positions, sizes))[3]
        with pytest.raises(tracekit.WriterError, match="No space left on device"):
            writer.write_step(ids, texts, arrays, step_time=t)
            writer.flush()
        monkeypatch.undo()
        with pytest.raises(tracekit.WriterError, match=f"keeps its {first} committed"):
            writer.close()
        assert trace.refresh() == first
        assert trace.status == "aborted" and not trace.complete
        assert trace.metadata["stop_reason"] == "No space left on device"
        assert trace.metadata["length"] == {"positions": first, "steps": 3}
    info = CliRunner().invoke(main, ["info", str(path)])
    assert info.exit_code == 0, info.output
    assert info.output.splitlines()[1].startswith(
        f"Status    aborted (No space left on device): {first} positions in 3 steps")
