"""Write the golden traces of the current format version in this folder (golden-v1.0-* were
written by format 1.0's writer, golden-v1.1-* by 1.1's). Run once per format version; never
rewrite a released version's files (tests/test_golden*.py check their hashes).

    python tests/data/make_golden.py            # refuses to overwrite existing files
    python tests/data/make_golden.py --force    # only while the version is unreleased

Every value follows a closed formula of its indices (below), chosen to be exact in bfloat16
and float16, so a test can state expected values without reading the generator's output.
``p`` position, ``j`` residual point index, ``i`` layer index, ``h`` hidden, ``k`` head,
``q`` key, ``n`` neuron, ``r`` rank (all indices into the stored axes):

    token_id[p]              = (7 p + 3) mod 50
    token text               = "t{p}"; position 2 is b"\\xff\\xfe" (not UTF-8), 3 is "long-3"
    residual[p, j, h]        = (p + 1) / 4 + j / 2 - h / 8
    attn_out[p, i, h]        = i + h / 4 - p / 2
    mlp_out[p, i, h]         = p - i / 2 - h / 4
    attention[p, i, k, q]    = (k + 1) / 4 if q == p; (k + 1) / 8 if q == 0 < p; else 0
    neurons[p, i, n]         = (p - n) / 2 + i
    top_ids[p, r]            = (p + r) mod 50;            top_logprobs[p, r] = -(r + 1) / 2
    lens_ids[p, j, r]        = (10 p + j + r) mod 50;     lens_logprobs[p, j, r] = -(r + 1) - j / 4
    step_time[s]             = 1700000000 + s / 4
    vocabulary (1.1)         = id i is "w{i}", except id 7: b"\\xff" (not UTF-8) and id 8: ""
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

import tracekit
import tracekit.writer
from tracekit.format import ModelInfo, TracePlan

HERE = Path(__file__).parent
VERSION = tracekit.FORMAT_VERSION_STR
VOCAB = 50
STEPS = [3, 1, 1]  # a 3-token prompt, then two generated tokens
FIXED_TIME = "2026-01-01T00:00:00Z"
ENVIRONMENT = {"tracekit": "0.1.0", "python": "3.11", "numpy": "2", "platform": "golden",
               "torch": None, "transformers": None}


def model() -> ModelInfo:
    return ModelInfo(name="golden/tiny", n_layers=2, d_model=4, n_heads=2, vocab_size=VOCAB,
                     d_mlp=3, architecture="GoldenForCausalLM", model_type="golden",
                     revision="v1")


def plans() -> dict[str, TracePlan]:
    return {
        # every group, bfloat16, both layers, finished normally
        "full": TracePlan(model=model(), max_positions=6, stored_dtype="bfloat16", top_k=2,
                          attention_top_k=2, token_bytes=4, chunk_bytes=256),
        # residual and attention of layer 1 only, float16, zstd, stopped early (aborted)
        "partial": TracePlan(model=model(), max_positions=8,
                             captured=frozenset({"residual", "attention"}), layers=(1,),
                             stored_dtype="float16", top_k=2, attention_top_k=2, token_bytes=4,
                             compression="zstd", chunk_bytes=256),
    }


def token(p: int) -> tuple[int, bytes]:
    text = {2: b"\xff\xfe", 3: b"long-3"}.get(p, f"t{p}".encode())
    return (7 * p + 3) % VOCAB, text


def rows(plan: TracePlan, p: int) -> dict[str, np.ndarray]:
    """All captured input arrays of position ``p`` (float32, keys up to ``p``)."""
    sizes = plan.dim_sizes()
    j = np.arange(sizes["point"])[:, None]
    i = np.arange(sizes["layer"])[:, None]
    h = np.arange(sizes["hidden"])[None, :]
    r = np.arange(sizes["rank"])
    out: dict[str, np.ndarray] = {}
    cap = plan.captured
    if "residual" in cap:
        out["residual"] = (p + 1) / 4 + j / 2 - h / 8
    if "attn_out" in cap:
        out["attn_out"] = i + h / 4 - p / 2
    if "mlp_out" in cap:
        out["mlp_out"] = p - i / 2 - h / 4
    if "attention" in cap:
        k = np.arange(sizes["head"])[None, :, None]
        att = np.zeros((sizes["layer"], sizes["head"], p + 1))
        att[..., p] = ((k + 1) / 4)[..., 0]
        if p > 0:
            att[..., 0] = ((k + 1) / 8)[..., 0]
        out["attention"] = att
    if "neurons" in cap:
        n = np.arange(sizes["neuron"])[None, :]
        out["neurons"] = (p - n) / 2 + i
    if "predictions" in cap:
        out["top_ids"] = (p + r) % VOCAB
        out["top_logprobs"] = -(r + 1) / 2
    if "logit_lens" in cap:
        out["lens_ids"] = (10 * p + j + r[None, :]) % VOCAB
        out["lens_logprobs"] = -(r[None, :] + 1) - j / 4
    dtypes = {"top_ids": np.int32, "lens_ids": np.int32}
    return {name: np.asarray(v, dtype=dtypes.get(name, np.float32)) for name, v in out.items()}


def vocabulary() -> list[bytes]:
    """The text of every id, for the format versions that store it (1.1 on)."""
    return [{7: b"\xff", 8: b""}.get(i, f"w{i}".encode()) for i in range(VOCAB)]


def record(path: Path, plan: TracePlan, status: str) -> None:
    extra = {} if VERSION == "1.0" else {"vocab": vocabulary()}
    writer = tracekit.create(
        path, plan, prompt_length=STEPS[0], environment=ENVIRONMENT,
        run={"prompt": "t0t1\xff", "generation": {"max_new_tokens": 2, "do_sample": False},
             "seed": 0, "model_dtype": "float32", "device": "cpu",
             "attn_implementation": "eager"},
        tags={"purpose": f"golden v{VERSION} trace", "formula": "tests/data/make_golden.py"},
        **extra)
    start = 0
    for s, n in enumerate(STEPS):
        positions = range(start, start + n)
        per_position = [rows(plan, p) for p in positions]
        arrays = {name: np.stack([r[name] for r in per_position])
                  for name in per_position[0] if name != "attention"}
        if "attention" in per_position[0]:
            att = np.zeros((n, *per_position[0]["attention"].shape[:2], start + n), np.float32)
            for x, row in enumerate(per_position):
                att[x, ..., : row["attention"].shape[-1]] = row["attention"]
            arrays["attention"] = att
        ids, texts = zip(*(token(p) for p in positions), strict=True)
        writer.write_step(list(ids), list(texts), arrays, step_time=1_700_000_000 + s / 4)
        start += n
    writer.close(status)


MANIFEST = HERE / f"golden-v{VERSION}.sha256"


def file_hashes(version: str = VERSION) -> dict[str, str]:
    """sha256 of every file of the golden traces of ``version``, by path relative to this
    folder."""
    import hashlib

    files = sorted(p for p in HERE.glob(f"golden-v{version}-*") if p.is_file())
    for folder in sorted(HERE.glob(f"golden-v{version}-*.zarr")):
        files += sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(HERE).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(files)}


def main(force: bool = False) -> None:
    tracekit.writer._utcnow = lambda: FIXED_TIME  # reproducible created/finished
    for name, plan in plans().items():
        status = "complete" if name == "full" else "aborted"
        for suffix in (".zarr", ".h5"):
            path = HERE / f"golden-v{VERSION}-{name}{suffix}"
            if path.exists():
                if not force:
                    sys.exit(f"{path} exists; golden traces of a released version never change")
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            record(path, plan, status)
            print(path)
    MANIFEST.write_text("".join(f"{h}  {p}\n" for p, h in file_hashes().items()))


if __name__ == "__main__":
    main(force="--force" in sys.argv)
