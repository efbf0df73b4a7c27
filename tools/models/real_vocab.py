"""Real tokenizers for test experts: llama.cpp's vocabulary-only GGUFs.

The llama-cpp-python source distribution carries ``vendor/llama.cpp/models/ggml-vocab-*.gguf``
(qwen2 151,936 tokens, llama-bpe = Llama 3 128,256, llama-spm = Llama 2 / Mistral-style
SentencePiece 32,000, phi-3, gpt-2, ...) with tokenizer test vectors (``.inp`` / ``.out``).
``scripts/install.sh`` extracts them into :func:`vocab_dir` (nothing is downloaded at run time
and none of them is committed). :class:`GgufTokenizer` reads one; a test expert written with it
(:func:`moe2.tools.models.fixtures.make_real_vocab_expert`) serves exactly that tokenizer in
llama.cpp, optionally padded with ``[PADn]`` tokens the way llama.cpp's converter pads a
vocabulary to the model's embedding size (Qwen2.5-7B: 152,064; -3B: 151,936).
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import gguf
import numpy as np
import numpy.typing as npt

#: where the vocabulary GGUFs live (``MOE2_VOCAB_DIR`` overrides)
DEFAULT_VOCAB_DIR = Path.home() / ".cache" / "moe2" / "llama-vocab"
#: llama.cpp's token types (gguf.TokenType): what a padding token is written as
TOKEN_UNUSED = int(gguf.TokenType.UNUSED)
#: the padding tokens llama.cpp's converter appends: ``[PAD151936]``
PAD_RE = re.compile(rb"^\[PAD\d+\]$")


class VocabMissingError(FileNotFoundError):
    """A vocabulary GGUF is not installed (the message says how to get it)."""


def vocab_dir() -> Path:
    return Path(os.environ.get("MOE2_VOCAB_DIR") or DEFAULT_VOCAB_DIR)


def vocab_path(name: str) -> Path:
    """``ggml-vocab-{name}.gguf`` in :func:`vocab_dir`; a clear error when it is missing."""
    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise VocabMissingError(
            f"{path} is missing: run `bash scripts/install.sh` (it extracts llama.cpp's "
            "vocabulary GGUFs from the llama-cpp-python source distribution), or point "
            "MOE2_VOCAB_DIR at a folder holding them")
    return path


def tokenizer_test_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for a vocabulary: (text, expected token ids)."""
    base = vocab_path(name)
    # every case is "<text>\n__ggml_vocab_test__\n" (the text may be empty), one .out line each
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")
    texts, lines = texts[:-1], lines[:-1]
    if len(texts) != len(lines):
        raise ValueError(f"{base}: {len(texts)} test texts but {len(lines)} expected outputs")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The key-value section of a GGUF file (v2/v3), fast: ``gguf.GGUFReader`` takes ~20 s on
    Qwen2's 151,936 tokens and 151,387 merges, this ~0.5 s. Strings stay bytes; numeric arrays
    are numpy arrays, string arrays lists of bytes."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _read_metadata(data, path)


def _read_metadata(data: mmap.mmap, path: str | os.PathLike[str]) -> dict[str, object]:
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24

    def string() -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        s = data[pos:pos + n]
        pos += n
        return s

    def value(kind: int) -> object:
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            item, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item == 8:
                return [string() for _ in range(n)]
            if item in _NUMPY:
                arr = np.frombuffer(data, dtype=_NUMPY[item], count=n, offset=pos).copy()
                pos += arr.nbytes
                return arr
            return [value(item) for _ in range(n)]
        fmt = _SCALARS[kind]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    out: dict[str, object] = {}
    for _ in range(n_kv):
        key = string().decode("utf-8")
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        out[key] = value(kind)
    return out


@dataclass(frozen=True)
class GgufTokenizer:
    """Every ``tokenizer.*`` field of a vocabulary GGUF, to be written into another GGUF."""

    name: str
    model: str
    pre: str | None
    tokens: tuple[bytes, ...]
    types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[bytes, ...] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None
    chat_template: str | None

    @property
    def size(self) -> int:
        return len(self.tokens)

    @classmethod
    def load(cls, name: str) -> GgufTokenizer:
        """``ggml-vocab-{name}.gguf`` from :func:`vocab_dir` (e.g. ``qwen2``, ``llama-bpe``)."""
        return _load(name)

    @classmethod
    def _from_metadata(cls, name: str, meta: dict[str, object]) -> GgufTokenizer:
        def opt_int(key: str) -> int | None:
            v = meta.get(key)
            return None if v is None else int(v)  # type: ignore[call-overload]

        def opt_bool(key: str) -> bool | None:
            v = meta.get(key)
            return None if v is None else bool(v)

        def opt_str(key: str) -> str | None:
            v = meta.get(key)
            return None if v is None else bytes(v).decode("utf-8")  # type: ignore[call-overload]

        tokens = cast("list[bytes]", meta["tokenizer.ggml.tokens"])
        types = cast("npt.NDArray[np.int32]", meta["tokenizer.ggml.token_type"])
        scores = cast("npt.NDArray[np.float32] | None", meta.get("tokenizer.ggml.scores"))
        merges = cast("list[bytes] | None", meta.get("tokenizer.ggml.merges"))
        return cls(
            name=name, model=opt_str("tokenizer.ggml.model") or "llama",
            pre=opt_str("tokenizer.ggml.pre"), tokens=tuple(tokens),
            types=tuple(int(t) for t in types),
            scores=None if scores is None else tuple(float(s) for s in scores),
            merges=None if merges is None else tuple(merges),
            bos_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_id=opt_int("tokenizer.ggml.eos_token_id"),
            unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
            pad_id=opt_int("tokenizer.ggml.padding_token_id"),
            add_bos=opt_bool("tokenizer.ggml.add_bos_token"),
            add_eos=opt_bool("tokenizer.ggml.add_eos_token"),
            add_space_prefix=opt_bool("tokenizer.ggml.add_space_prefix"),
            chat_template=opt_str("tokenizer.chat_template"),
        )

    def padded(self, size: int) -> GgufTokenizer:
        """Padded to ``size`` tokens with ``[PADn]`` (type UNUSED), as llama.cpp's converter
        pads a vocabulary to the model's embedding rows."""
        if size < self.size:
            raise ValueError(f"cannot pad {self.size} tokens down to {size}")
        extra = range(self.size, size)
        return replace(
            self, tokens=self.tokens + tuple(f"[PAD{i}]".encode() for i in extra),
            types=self.types + (TOKEN_UNUSED,) * len(extra),
            scores=None if self.scores is None else self.scores + (-1000.0,) * len(extra))

    def add_to(self, writer: gguf.GGUFWriter, chat_template: str | None = None) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        writer.add_token_types(list(self.types))
        if self.scores is not None:
            writer.add_token_scores(list(self.scores))
        if self.merges is not None:
            writer.add_token_merges(list(self.merges))
        for value, add in ((self.bos_id, writer.add_bos_token_id),
                           (self.eos_id, writer.add_eos_token_id),
                           (self.unk_id, writer.add_unk_token_id),
                           (self.pad_id, writer.add_pad_token_id)):
            if value is not None:
                add(value)
        for flag, add_flag in ((self.add_bos, writer.add_add_bos_token),
                               (self.add_eos, writer.add_add_eos_token),
                               (self.add_space_prefix, writer.add_add_space_prefix)):
            if flag is not None:
                add_flag(flag)
        template = chat_template if chat_template is not None else self.chat_template
        if template is not None:
            writer.add_chat_template(template)


@functools.lru_cache(maxsize=8)
def _load(name: str) -> GgufTokenizer:
    return GgufTokenizer._from_metadata(name, read_gguf_metadata(vocab_path(name)))
