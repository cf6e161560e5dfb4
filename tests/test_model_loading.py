"""Loading a model by name: hub ids fail fast and say so when the hub is out of reach, a cached
model still loads offline, a model's own code never runs by default, and pickled weights are
never loaded."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import huggingface_hub.constants as hub_constants  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from tracekit.cli import main  # noqa: E402
from tracekit.recorder import hub, load_model  # noqa: E402
from tracekit.recorder.errors import RecorderError  # noqa: E402
from tracekit.recorder.testing import save_tiny_model  # noqa: E402

MADE_UP = "tracekit-tests/no-such-model-7f3a"


@pytest.fixture
def unreachable_hub(monkeypatch) -> str:
    """A hub endpoint that refuses connections (a closed local port), whatever the network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return endpoint


@pytest.fixture
def silent_hub(monkeypatch):
    """A hub endpoint that accepts connections and never answers (a hanging network)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HUB_PROBE_TIMEOUT_S", 0.5)
    yield
    server.close()


@pytest.fixture
def answering_hub(monkeypatch) -> str:
    """A hub endpoint that answers every request as the hub does for a repository it does not
    have (an online hub without the model)."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")  # as the hub says it
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)  # what the probe asks
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",  # what downloads ask
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    yield endpoint
    server.shutdown()


def test_an_answering_hub_is_used_and_a_made_up_id_is_not_found(answering_hub: str) -> None:
    assert hub.hub_unreachable() is None
    started = time.perf_counter()
    with pytest.raises(RecorderError) as err:
        load_model(MADE_UP, device="cpu")
    assert time.perf_counter() - started < 5
    assert str(err.value) == (f"cannot load model {MADE_UP!r}: no such model on "
                              f"{answering_hub}, and no such local folder")


def test_a_made_up_hub_id_fails_fast_offline(unreachable_hub: str) -> None:
    started = time.perf_counter()
    with pytest.raises(RecorderError) as err:
        load_model(MADE_UP, device="cpu")
    assert time.perf_counter() - started < 5
    assert str(err.value) == (
        f"cannot load model {MADE_UP!r}: offline ({unreachable_hub} did not answer: "
        f"ConnectError), and it is not in the Hugging Face cache {hub_constants.HF_HUB_CACHE}")


def test_a_hanging_network_costs_one_short_probe(silent_hub) -> None:
    started = time.perf_counter()
    with pytest.raises(RecorderError, match=r"offline \(.* did not answer: \w*Timeout"):
        load_model(MADE_UP, device="cpu")
    assert time.perf_counter() - started < 3


def test_hf_hub_offline_is_honoured_without_a_probe(monkeypatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://unused.invalid")  # never asked
    with pytest.raises(RecorderError, match=r"offline \(HF_HUB_OFFLINE is set\), and it is not "
                                            r"in the Hugging Face cache"):
        load_model(MADE_UP, device="cpu")


def test_record_says_offline_in_one_line(unreachable_hub: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["record", MADE_UP, "-p", "hi", "-o",
                                       str(tmp_path / "t.zarr")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "offline" in result.stderr
    assert MADE_UP in result.stderr and "Retry" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_cached_hub_model_loads_offline(unreachable_hub: str, tmp_path: Path,
                                          monkeypatch) -> None:
    """A model in the Hugging Face cache (the layout huggingface_hub downloads into) loads
    with the hub out of reach."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tracekit-tests--tiny-gpt2"
    save_tiny_model(repo / "snapshots" / commit, "gpt2", vocab_size=300)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model("tracekit-tests/tiny-gpt2", device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel" and len(tokenizer) == 300


def test_a_models_own_code_never_runs_by_default(tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tracekit-test-remote", "architectures": ["RemoteModel"],
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModel": "remote.RemoteModel"}}))
    (folder / "remote.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').touch()\n")
    with pytest.raises(RecorderError) as err:
        load_model(str(folder), device="cpu")
    assert str(err.value) == (f"cannot load model {str(folder)!r}: it needs its own Python code, "
                              f"which runs only with --trust-remote-code (off by default)")
    assert not (folder / "CODE_RAN").exists()


def test_pickled_weights_are_never_loaded(tmp_path: Path) -> None:
    """A folder whose weights are a pytorch_model.bin (a pickle) is refused, although
    transformers itself would load it."""
    folder = save_tiny_model(tmp_path / "pickled", "gpt2", vocab_size=300)
    model, _ = load_model(str(folder), device="cpu")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(RecorderError) as err:
        load_model(str(folder), device="cpu")
    assert str(err.value) == (
        f"cannot load model {str(folder)!r}: it has no safetensors weights; weights in pickle "
        f"files (.bin, .pt) are never loaded, since unpickling can run code")


# -- replay of a trace from elsewhere: it names any model --------------------------------------

def _trace_naming(name: str, tmp_path: Path) -> Path:
    """A real trace of a tiny model whose metadata names ``name`` as its model."""
    from tracekit.recorder import record
    from tracekit.recorder.testing import tiny_model

    out = tmp_path / "untrusted.zarr"
    record(tiny_model("gpt2", vocab_size=300), input_ids=[5, 6, 7], out=out, max_new_tokens=2,
           capture=["residual"], name=name)
    return out


def replay(*args: object):
    return CliRunner().invoke(main, ["replay", *map(str, args)])


def test_replay_names_the_model_and_where_from_and_fails_fast_offline(
        unreachable_hub: str, tmp_path: Path) -> None:
    trace = _trace_naming(MADE_UP, tmp_path)
    started = time.perf_counter()
    result = replay(trace)
    assert time.perf_counter() - started < 5
    assert result.exit_code == 1
    cache = hub_constants.HF_HUB_CACHE
    assert result.stderr == (
        f"Loading   {MADE_UP} (named by the trace) from the Hugging Face cache ({cache}), "
        f"else {unreachable_hub}\n"
        f"Error: cannot load model {MADE_UP!r}: offline ({unreachable_hub} did not answer: "
        f"ConnectError), and it is not in the Hugging Face cache {cache}; the trace names this "
        f"model: pass --model PATH to load it from a local folder\n")


def test_replay_never_runs_the_code_of_the_model_a_trace_names(tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tracekit-test-remote", "architectures": ["RemoteModel"],
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModel": "remote.RemoteModel"}}))
    (folder / "remote.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').touch()\n")
    result = replay(_trace_naming(str(folder), tmp_path))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"Error: cannot load model {str(folder)!r}: it needs its own Python code")
    assert not (folder / "CODE_RAN").exists()


def test_replay_never_unpickles_the_weights_a_trace_points_to(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "pickled", "gpt2", vocab_size=300)
    trace = _trace_naming(str(folder), tmp_path)
    assert replay(trace).exit_code == 0  # the same folder with safetensors weights replays
    model, _ = load_model(str(folder), device="cpu")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    result = replay(trace)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"Error: cannot load model {str(folder)!r}: it has no safetensors weights")


def test_the_minilm_sample_says_how_to_replay_it_offline(unreachable_hub: str) -> None:
    sample = Path(__file__).resolve().parent.parent / "sample_traces" / "minilm_fox.zarr"
    if not sample.exists():
        pytest.skip("no sample traces yet (python scripts/make_sample_traces.py)")
    started = time.perf_counter()
    result = replay(sample)
    assert time.perf_counter() - started < 5
    assert result.exit_code == 1
    loading, error = result.stderr.splitlines()
    assert loading.startswith("Loading   sentence-transformers/all-MiniLM-L6-v2 (named by the "
                              "trace) from the Hugging Face cache")
    assert error.startswith("Error: cannot load model 'sentence-transformers/all-MiniLM-L6-v2': "
                            "offline")
    assert error.endswith("pass --model PATH to load it from a local folder")
