"""The fuzzer (``tests/fuzz.py``) finds no traceback, hang, crash or over-budget allocation:
a few hundred mutated traces here, thousands in the slow run."""

from __future__ import annotations

import fuzz
import pytest

#: Cases of the fast run (about 35 s with two workers); the slow run takes ten times as many.
FAST_CASES = 300
SLOW_CASES = 3000


def check(report: dict) -> None:
    bad = [f"{r['index']} {r['outcome']}: {r.get('what', '')} -> {r['detail']}"
           for r in report["bad"]]
    assert not bad, "\n".join(bad)
    counts = report["counts"]
    assert sum(counts.values()) == report["cases"]
    # The mutations reach both ends: most are refused, some change only what validate and
    # reading accept (a value, a chunk's bytes).
    assert counts["clean"] > report["cases"] // 2, counts
    assert counts["accepted"] > 0, counts


def test_fuzz_cases_end_cleanly() -> None:
    check(fuzz.fuzz(FAST_CASES, seed=0, jobs=2))


@pytest.mark.slow
def test_fuzz_thousands_of_cases_end_cleanly() -> None:
    check(fuzz.fuzz(SLOW_CASES, seed=1, jobs=4))


def test_a_case_is_rebuilt_from_its_index(tmp_path) -> None:
    """``--replay N`` relies on it: the same damage, byte for byte."""
    seeds = fuzz.make_seeds(tmp_path / "seeds")
    for index in range(6):
        a, what_a = fuzz.build_case(seeds, tmp_path / "a", 0, index)
        b, what_b = fuzz.build_case(seeds, tmp_path / "b", 0, index)
        assert what_a == what_b
        files_a = sorted(p.relative_to(a) for p in a.rglob("*")) if a.is_dir() else [a.name]
        files_b = sorted(p.relative_to(b) for p in b.rglob("*")) if b.is_dir() else [b.name]
        assert files_a == files_b
        if a.is_file():
            assert a.read_bytes() == b.read_bytes()


def test_a_hang_and_a_crash_are_caught(tmp_path, monkeypatch) -> None:
    """The driver's own classes work: a worker that blocks is a hang, one that dies by a
    signal is a signal, and the run goes on with a fresh worker."""
    import sys
    import time

    script = tmp_path / "w.py"
    script.write_text(
        "import json, os, signal, sys, time\n"
        "for line in sys.stdin:\n"
        "    i = int(line)\n"
        "    if i == 1: time.sleep(60)\n"
        "    if i == 2: os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    print(json.dumps({'index': i, 'outcome': 'clean', 'detail': ''}), flush=True)\n")

    class Fake(fuzz.Worker):
        def __init__(self, *args) -> None:
            import subprocess

            self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)

    monkeypatch.setattr(fuzz, "Worker", Fake)
    monkeypatch.setattr(fuzz, "make_seeds", lambda root: {})
    start = time.monotonic()
    report = fuzz.fuzz(4, timeout=2.0)
    assert time.monotonic() - start < 30
    assert report["counts"]["hang"] == 1 and report["counts"]["signal"] == 1, report
    assert report["counts"]["clean"] == 2
