"""Chunk and size figures of format v1 (part of :mod:`tracekit.format`, which exports these
names): chunk checksums, attention tile and coordinate chunk sizes, the HDF5 page and its
page-filling tile shapes, and the metadata bytes that trace size estimates add."""

from __future__ import annotations

#: Bytes each stored chunk carries beyond its data from format 1.1 on: zarr's ``crc32c`` codec
#: and HDF5's Fletcher-32 filter both append a 4-byte checksum.
CHUNK_CHECKSUM_BYTES = 4
#: Attention (every array with a ``key`` axis) is stored in tiles of positions x keys, about
#: a 40th of the planned length on a side, so that a causal trace stores only the tiles on or
#: below the diagonal: about ``1 + 2 / ATTENTION_TILES`` times the triangle it holds (1.06 at
#: 500 positions with the edges), in about 800 tiles (zarr: files) whatever the length. Tiles
#: are at least ``MIN_ATTENTION_TILE`` on a side and at most ``chunk_bytes`` large.
ATTENTION_TILES = 40
MIN_ATTENTION_TILE = 8
#: Values per chunk of the coordinate arrays.
COORD_CHUNK = 1 << 16
#: The HDF5 backend's file space page (storage/_hdf5.py): chunks of a page or more take whole
#: pages, so attention tiles are shaped to fill theirs (see attention_tile).
HDF5_PAGE_BYTES = 4096
# Metadata bytes of a finished trace beyond its chunks: least-squares fits to demo-model
# recordings of 1 to 505 positions and 18 to 36 arrays (tests/test_attention_tiles.py checks
# the estimate against real recordings). zarr: the group's document, then each array's
# zarr.json and its consolidated copy. HDF5: each array's object header, dimension scale links
# and their pages, and each chunk's index entry; an HDF5 file also grows with its commits (each
# flush leaves some metadata space behind: 110 to 370 bytes per chunk were fitted, from fast
# to slow recordings, whence 200), so its estimate is good to about 5%.
ZARR_BASE_BYTES = 544
ZARR_ARRAY_BYTES = 965
HDF5_BASE_BYTES = -24812  # negative: the per-array figure is a slope over 18-36 arrays
HDF5_ARRAY_BYTES = 3730
HDF5_CHUNK_BYTES = 200


def _fill_pages(rows: int, keys: int, cell: int, limit: int) -> tuple[int, int]:
    """A tile near ``rows`` x ``keys`` (no larger in rows + keys) whose bytes plus the chunk
    checksum fill whole HDF5 pages: a power-of-two tile of 16 x 16 x 32 bytes is exactly two
    pages, and its checksum would make it take three (HDF5 gives a chunk whole pages)."""
    def waste(r: int, k: int) -> float:
        nbytes = r * k * cell + CHUNK_CHECKSUM_BYTES
        if nbytes < HDF5_PAGE_BYTES:
            return 0.0
        return (-nbytes % HDF5_PAGE_BYTES) / (r * k * cell)

    if waste(rows, keys) < 0.02:
        return rows, keys
    shapes = [(r, k) for r in range(max(1, rows - 4), rows + 1)
              for k in range(max(1, keys - 4), min(limit, keys + 4) + 1) if r + k <= rows + keys]
    # The largest tile that wastes under 2% of itself, else the least wasteful.
    return min(shapes, key=lambda t: (waste(*t) >= 0.02, -t[0] * t[1] if waste(*t) < 0.02
                                      else waste(*t)))
#: The vocabulary is always compressed (PACKED), so its size on disk follows from its content,
#: not its shape: bytes per byte of token text and per token id (its length and coordinate),
#: fitted to the demo model's 2048-id byte-level BPE (8,100 text bytes: 7 KB of chunks) and a
#: 50257-id byte-level BPE (341,767 text bytes: 211 KB); MiniLM's 30522 WordPiece ids come out
#: at 130 KB against 126 KB measured (``benchmarks/bench_vocab.py``).
VOCAB_TEXT_BYTE_COST = 0.28
VOCAB_ID_COST = 2.3
