"""SentencePiece BPE vocabularies (byte fallback) trained in memory on :mod:`.text`:
:func:`default_vocab` is the one the test experts share, :func:`other_vocab` a different one of
the same size (the mismatch path)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt
import sentencepiece as spm

from moe2.tools.models.text import synthetic_corpus

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
FileType = Literal["f32", "f16"]

DEFAULT_VOCAB_SIZE = 512



def fingerprint_tokens(tokens: Sequence[str], types: Sequence[int]) -> str:
    """sha256 (hex) over the token pieces and their gguf ``TokenType`` values, in id order.

    Each token contributes ``uint32_le(len(utf8)) + utf8 + uint8(type)``. Two experts can share
    next-token distributions exactly when their fingerprints are equal. An agent can recompute it
    from llama.cpp alone: ``llama_token_get_text`` gives the piece and ``llama_token_get_attr``
    the type (NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6).
    """
    if len(tokens) != len(types):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    digest = hashlib.sha256()
    for piece, kind in zip(tokens, types, strict=True):
        raw = piece.encode("utf-8")
        digest.update(len(raw).to_bytes(4, "little"))
        digest.update(raw)
        digest.update(int(kind).to_bytes(1, "little"))
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_proto)


@dataclass(frozen=True)
class SpmVocab:
    """A SentencePiece vocabulary as GGUF stores it (``tokenizer.ggml.model = "llama"``)."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]  # gguf.TokenType values
    bos_id: int
    eos_id: int
    unk_id: int
    #: Serialized sentencepiece ``ModelProto``; ``None`` when read back from a GGUF file.
    model_proto: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.scores) == len(self.types):
            raise ValueError("tokens, scores and types must have the same length")
        for tid in (self.bos_id, self.eos_id, self.unk_id):
            if not 0 <= tid < len(self.tokens):
                raise ValueError(f"special token id {tid} outside the vocabulary")

    @property
    def size(self) -> int:
        return len(self.tokens)

    def fingerprint(self) -> str:
        """See :func:`fingerprint_tokens`."""
        return fingerprint_tokens(self.tokens, self.types)

    @classmethod
    def from_model_proto(cls, model_proto: bytes) -> SpmVocab:
        """Build from a serialized sentencepiece model (as written by the trainer)."""
        sp = _processor(model_proto)
        tokens: list[str] = []
        scores: list[float] = []
        types: list[int] = []
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            if sp.is_unknown(i):
                kind = gguf.TokenType.UNKNOWN
            elif sp.is_control(i):
                kind = gguf.TokenType.CONTROL
            elif sp.is_unused(i):
                kind = gguf.TokenType.UNUSED
            elif sp.is_byte(i):
                kind = gguf.TokenType.BYTE
            else:
                kind = gguf.TokenType.NORMAL
            types.append(int(kind))
        return cls(
            tokens=tuple(tokens),
            scores=tuple(scores),
            types=tuple(types),
            bos_id=int(sp.bos_id()),
            eos_id=int(sp.eos_id()),
            unk_id=int(sp.unk_id()),
            model_proto=model_proto,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpmVocab:
        """Load a ``.model`` file written by :meth:`save` (or by sentencepiece itself)."""
        return cls.from_model_proto(Path(path).read_bytes())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the sentencepiece ``.model`` file."""
        Path(path).write_bytes(self._require_proto())

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokenise with sentencepiece itself (the reference for llama.cpp's tokenizer)."""
        ids = [int(i) for i in _processor(self._require_proto()).encode(text)]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(_processor(self._require_proto()).decode([int(i) for i in ids]))

    def _require_proto(self) -> bytes:
        if self.model_proto is None:
            raise ValueError("this vocabulary has no sentencepiece model (read from a GGUF?)")
        return self.model_proto


def train_spm_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    seed: int = 0,
    model_type: Literal["bpe", "unigram"] = "bpe",
) -> SpmVocab:
    """Train a SentencePiece model in memory: byte fallback, single thread, deterministic.

    Normalisation is ``identity`` and extra whitespace is kept, because llama.cpp's SPM tokenizer
    does neither NFKC nor whitespace folding; with a BPE model llama.cpp then tokenises exactly as
    sentencepiece does. (llama.cpp applies BPE-style score merges to every ``llama`` vocabulary,
    so a ``unigram`` model can tokenise differently there; it is offered for experiments only.)
    """
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    sentences: Iterator[str] = (t.replace("\n", " ") for t in texts)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    vocab = SpmVocab.from_model_proto(model.getvalue())
    logger.debug("trained %s vocabulary of %d pieces (%s)", model_type, vocab.size,
                 vocab.fingerprint()[:12])
    return vocab


@functools.lru_cache(maxsize=8)
def default_vocab(vocab_size: int = DEFAULT_VOCAB_SIZE) -> SpmVocab:
    """The vocabulary shared by the test experts (trained on the ``base`` corpus)."""
    return train_spm_tokenizer(synthetic_corpus(variant="base"), vocab_size)


@functools.lru_cache(maxsize=8)
def other_vocab(vocab_size: int = DEFAULT_VOCAB_SIZE) -> SpmVocab:
    """A different vocabulary (trained on the ``alt`` corpus): same ``n_vocab`` as
    :func:`default_vocab`, different tokens, so only a fingerprint tells them apart."""
    return train_spm_tokenizer(synthetic_corpus(variant="alt"), vocab_size)


