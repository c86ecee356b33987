"""Framing of large payloads on gRPC: a protobuf header plus raw bytes that protobuf never copies.

On the wire a message is a 4-byte little-endian header length, the serialized header message
(its `data` field left empty), then the payload. Sender and receiver each copy the payload
once; through protobuf's bytes field it would be copied three more times.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from twinfer.protocols.roles import DEALER
from twinfer.parties.errors import PeerError, ProtocolError
from twinfer.parties.proto import twinfer_pb2 as pb

_HEADER_LEN = struct.Struct("<I")
H = TypeVar("H", bound=Message)


class Framed(Generic[H]):
    """A header message and its payload; header fields read through (frame.seq, frame.tag)."""

    __slots__ = ("header", "data")

    def __init__(self, header: H, data: bytes | memoryview = b"") -> None:
        self.header = header
        self.data = data

    def __getattr__(self, name: str):
        return getattr(self.header, name)


def join_payloads(frames: list[Framed], dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """The frames' payloads copied once into an array this process owns (views are read-only).

    None when their sizes do not add up to `shape` of `dtype`; the caller says why it matters.
    """
    out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=dtype)
    raw = out.view(np.uint8)
    if sum(len(f.data) for f in frames) != raw.size:
        return None
    offset = 0
    for f in frames:
        raw[offset : offset + len(f.data)] = np.frombuffer(f.data, dtype=np.uint8)
        offset += len(f.data)
    return out.reshape(shape)


def encode_framed(header: Message, payload: bytes | memoryview = b"") -> bytes:
    """Header length, header, payload: one copy of the payload."""
    head = header.SerializeToString()
    return b"".join((_HEADER_LEN.pack(len(head)), head, payload))


def framed_decoder(header_type: type[H]) -> Callable[[bytes], Framed[H]]:
    """The inverse of encode_framed for one header type; the payload is a view, not a copy."""

    def decode(raw: bytes) -> Framed[H]:
        if len(raw) < _HEADER_LEN.size:
            raise ProtocolError(f"a frame of {len(raw)} bytes is too short to hold a header")
        (n,) = _HEADER_LEN.unpack_from(raw)
        if _HEADER_LEN.size + n > len(raw):
            raise ProtocolError(f"a frame announces a {n}-byte header but holds {len(raw)} bytes")
        try:
            header = header_type.FromString(raw[_HEADER_LEN.size : _HEADER_LEN.size + n])
        except DecodeError as err:
            raise ProtocolError(f"a {header_type.__name__} header cannot be parsed: {err}") from None
        return Framed(header, memoryview(raw)[_HEADER_LEN.size + n :])

    return decode


def correlation_to_frames(index: int, arrays: dict[str, np.ndarray], chunk_bytes: int) -> list[bytes]:
    """A correlation's named arrays as framed TupleReply chunks of at most `chunk_bytes` each."""
    infos = [pb.ArrayInfo(name=k, dtype=v.dtype.name, shape=list(v.shape)) for k, v in arrays.items()]
    # one copy (into each frame) where the correlation is one array, as a key is: no joined payload first
    parts = [memoryview(np.ascontiguousarray(v).reshape(-1).view(np.uint8)) for v in arrays.values()]
    payload = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
    count = max(1, -(-len(payload) // chunk_bytes))
    return [
        encode_framed(
            pb.TupleReply(chunk_index=i, chunk_count=count, index=index, arrays=infos),
            payload[i * chunk_bytes : (i + 1) * chunk_bytes],
        )
        for i in range(count)
    ]


def correlation_from_frames(frames: list[Framed]) -> dict[str, np.ndarray]:
    """The inverse of correlation_to_frames: the named arrays, copied once into owned memory."""
    if not frames:
        raise PeerError("dealer sent an empty tuple reply", origin=DEALER)
    try:
        layout = [(info.name, np.dtype(info.dtype), tuple(info.shape)) for info in frames[0].arrays]
    except TypeError as err:
        raise PeerError(f"dealer sent an array of unknown dtype: {err}", origin=DEALER) from None
    sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, dtype, shape in layout]
    raw = join_payloads(frames, np.dtype(np.uint8), (sum(sizes),))
    if raw is None:
        got = sum(len(f.data) for f in frames)
        described = [(name, dtype.name, list(shape)) for name, dtype, shape in layout]
        raise PeerError(f"dealer sent {got} bytes for arrays {described}", origin=DEALER)
    out, offset = {}, 0
    for (name, dtype, shape), size in zip(layout, sizes):
        out[name] = raw[offset : offset + size].view(dtype).reshape(shape)
        offset += size
    return out
