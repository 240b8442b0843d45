"""Whole-chunk writes that skip zarr's per-chunk machinery, for writers that produce one chunk at a time.

Every ``array[c, t] = image`` in zarr-python 3 goes through its event loop: one background thread runs every
writer's coroutines, copies the value into a fresh chunk buffer and hands compression to yet another thread
pool. For ingest, which writes many large chunks from several threads at once, that costs several times the
compression itself (``benchmarks/scale.py`` compares ingest with bare decode+compress). A
:class:`ChunkWriter` encodes the chunk in the calling thread with the same codec and the same settings as the
array's metadata says (numcodecs, the library zarr's own codecs call) and puts the bytes at zarr's own chunk
key, so the store is the one zarr would have written, byte for byte (tested in tests/storage/).

Only codec chains whose bytes are known exactly are written this way: the plain ``bytes`` serializer on a
one-byte dtype, optionally followed by one zstd or blosc compressor. Any other chain (a sharded or transposed
array, a checksum codec, a wider dtype) falls back to zarr's own path, so nothing is ever written wrongly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from storage import uri as uris

Encode = Callable[[np.ndarray], bytes | memoryview]
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _compressor(codec: object) -> Encode | None:
    """A numcodecs encoder giving the same bytes as this zarr bytes-to-bytes codec; None when unknown."""
    config = codec.to_dict().get("configuration", {})  # the settings written into zarr.json
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=config["level"], checksum=config.get("checksum", False)).encode
    if isinstance(codec, BloscCodec):
        blosc = numcodecs.Blosc.from_config({"cname": config["cname"], "clevel": config["clevel"],
                                             "shuffle": _BLOSC_SHUFFLE[config["shuffle"]],
                                             "blocksize": config["blocksize"], "typesize": config["typesize"]})
        return blosc.encode
    return None


def chunk_encoder(array: zarr.Array) -> Encode | None:
    """How to encode one whole chunk of ``array`` exactly as zarr would, or None where this is not known."""
    metadata = array.metadata
    if getattr(metadata, "zarr_format", None) != 3 or array.dtype.itemsize != 1:
        return None  # a one-byte dtype has no byte order: the bytes serializer is the C-order buffer itself
    codecs = list(metadata.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    if len(codecs) == 1:
        return lambda chunk: memoryview(chunk).cast("B")
    if len(codecs) == 2:
        return _compressor(codecs[1])
    return None


class ChunkWriter:
    """Writes whole chunks of one array of a store: encoded here, put at zarr's chunk key.

    Use :meth:`write` with the chunk's grid coordinates and its exact (C-contiguous) contents. Arrays whose
    codec chain is not known exactly are written through zarr instead (``direct`` says which path is taken).
    """

    def __init__(self, uri: str, array: zarr.Array) -> None:
        uri = uris.normalize(uri)
        self._array = array
        self._encode = chunk_encoder(array)
        self._local_root = uri if uris.is_local(uri) else None
        self._fs, self._root = (None, None) if self._local_root else uris.filesystem(uri)

    @property
    def direct(self) -> bool:
        return self._encode is not None

    def write(self, coords: tuple[int, ...], chunk: np.ndarray) -> None:
        """Store ``chunk`` as the chunk at grid position ``coords`` (its shape must be the chunk shape)."""
        chunk_shape = self._array.chunks
        if chunk.shape != chunk_shape or chunk.dtype != self._array.dtype:
            raise ValueError(f"{self._array.path}: a chunk must be {chunk_shape} {self._array.dtype}, "
                             f"got {chunk.shape} {chunk.dtype}")
        if any(not 0 <= c < n for c, n in zip(coords, self._array.cdata_shape)):
            raise IndexError(f"{self._array.path}: chunk {coords} is outside the grid {self._array.cdata_shape}")
        if self._encode is None:
            self._array[tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, chunk_shape))] = chunk
            return
        data = self._encode(np.ascontiguousarray(chunk))
        key = f"{self._array.path}/{self._array.metadata.encode_chunk_key(coords)}"
        if self._local_root is not None:
            _put_file(os.path.join(self._local_root, key), data)
        else:
            self._fs.pipe_file(f"{self._root.rstrip('/')}/{key}", bytes(data))


def _put_file(path: str, data: bytes | memoryview) -> None:
    """Write beside the target and rename, as zarr's LocalStore does: a reader never sees half a chunk."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
