"""The coders, keyed by the numeric id that every stored stream carries in its header and in `.info`.

A stream is decoded by the coder registered under the id it stores: a file never names code to import.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from typing import TypeVar

import torch

from ..errors import SparsezipError
from .stream import EncodedWeight, OpenStream, open_stream


class Codec(ABC):
    """A tile coder. Subclasses set the class attributes and register with @register_codec."""

    name: str
    version: str
    codec_id: int

    @abstractmethod
    def encode(self, weight: torch.Tensor) -> EncodedWeight:
        """Compress a 2-D float16 weight [n, k]."""

    @abstractmethod
    def decode(self, enc: EncodedWeight) -> torch.Tensor:
        """Validate everything and decompress to a CPU float16 tensor [n, k]."""

    @abstractmethod
    def decode_tile(self, enc: EncodedWeight, tile: int) -> torch.Tensor:
        """Decompress one tile [rows_t, cols_t], reading only that tile's bytes."""

    def open(self, enc: EncodedWeight, *, check_crc: bool) -> OpenStream:
        """The validated stream of `enc`, which must belong to this coder."""
        opened = open_stream(enc, check_crc=check_crc)
        if opened.codec_id != self.codec_id:
            raise SparsezipError(f"info codec id {opened.codec_id} does not belong to codec {self.name!r}")
        return opened


class Registry:
    """Coders by name and by id; one instance (CODECS) holds the coders this package defines."""

    def __init__(self) -> None:
        self.by_name: dict[str, Codec] = {}
        self.by_id: dict[int, Codec] = {}

    def add(self, codec: Codec) -> None:
        if not 1 <= codec.codec_id <= 0xFFFF:
            raise SparsezipError(f"codec {codec.name!r}: id {codec.codec_id} must be in 1..65535")
        if codec.name in self.by_name or codec.codec_id in self.by_id:
            raise SparsezipError(f"codec {codec.name!r} (id {codec.codec_id}) clashes with a registered codec; "
                                 f"known codecs: {self.known()}")
        self.by_name[codec.name] = codec
        self.by_id[codec.codec_id] = codec

    def known(self) -> str:
        return ", ".join(f"{c.name} (id {c.codec_id})" for c in self.by_id.values()) or "none"

    def get(self, name: str) -> Codec:
        try:
            return self.by_name[name]
        except (KeyError, TypeError):
            raise SparsezipError(f"unknown codec {name!r}; known codecs: {self.known()}") from None

    def for_id(self, codec_id: int) -> Codec:
        try:
            return self.by_id[operator.index(codec_id)]
        except (KeyError, TypeError):
            raise SparsezipError(f"unknown codec id {codec_id!r}; known codecs: {self.known()}") from None


CODECS = Registry()
_CodecT = TypeVar("_CodecT", bound=type[Codec])


def register_codec(cls: _CodecT) -> _CodecT:
    """Class decorator: instantiate the coder and make it findable by name and by id."""
    CODECS.add(cls())
    return cls
