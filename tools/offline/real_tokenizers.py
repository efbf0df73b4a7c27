"""Domain experts with real tokenizers (``moe2 make-experts --tokenizers qwen2,llama-bpe,...``).

A real tokenizer has 32k-152k tokens; the generated corpus uses a thousand or two of them.
Training a softmax over the whole vocabulary would cost ~100x the small model itself on two
cores, so each tokenizer is *compacted*: the model trains over the ids the corpus uses plus one
``OTHER`` class that stands for all the others, and is scattered back into the full vocabulary
when exported. The scatter is exact, not an approximation:

* ``OTHER``'s logit gets ``+log(n_unused)`` during training (a fixed offset), so its
  probability is the *total* of the unused ids;
* on export every unused id's output row is ``OTHER``'s row: each gets logit ``h . w_other``,
  and together ``n_unused * exp(h . w_other)`` -- exactly the mass trained. llama.cpp's full
  softmax therefore equals the compact model's, id for id (tested);
* unused ids' input embeddings are the mean of the trained ones (an agent may still have to
  read them when it follows text written by experts of other tokenizers).

Sequences are tokenised the way an agent scores and reads them (:meth:`Codec.encode_example`):
``prompt`` raw with the vocabulary's own BOS rule, the answer as prompt + " " + answer
tokenised together and cut at the prompt's tokens (the agent's ``ScoreAnswer``), then the
vocabulary's EOS.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.tools.models.real_vocab import GgufTokenizer, vocab_path

#: the trained SentencePiece vocabulary of the generated corpus (the default)
TRAINED = "spm"
#: ``--tokenizers mixed``: the paper's three base families (Qwen2.5, Llama 3, Mistral-style
#: SentencePiece), cycled over the experts
MIXED = ("qwen2", "llama-bpe", "llama-spm")


def parse_tokenizers(text: str) -> tuple[str, ...]:
    """``spm``, ``mixed`` or a comma list of ``spm`` and llama.cpp vocabulary names; each real
    one must be installed (a clear error says how otherwise)."""
    names = MIXED if text.strip() == "mixed" else tuple(
        n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("--tokenizers is empty")
    for n in names:
        if n != TRAINED:
            vocab_path(n)  # raises VocabMissingError with the fix
    return names


def tokenizer_for(names: Sequence[str], expert: int) -> str:
    """The tokenizer of expert ``expert``: the list cycled."""
    return names[expert % len(names)]


class _LlamaTokenize:
    """llama.cpp's own tokenizer for a vocabulary GGUF (what the agent will run: the same
    ``llama_tokenize`` call), loaded vocabulary-only, without a context."""

    def __init__(self, name: str) -> None:
        import llama_cpp as L
        from llama_cpp import _logger

        _logger.set_verbose(False)
        self._L: Any = L
        params = L.llama_model_default_params()
        params.vocab_only = True
        self._model = L.llama_model_load_from_file(str(vocab_path(name)).encode(), params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load the {name} vocabulary")
        self._vocab = L.llama_model_get_vocab(self._model)

    def __call__(self, text: str, *, add_bos: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._L.llama_token * n_max)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, False)
        if n < 0:
            raise ValueError(f"{text!r} has more than {n_max} tokens")
        return [int(t) for t in buf[:n]]

    def close(self) -> None:
        if self._model:
            self._L.llama_model_free(self._model)
            self._model = None


@dataclass
class Codec:
    """One real tokenizer compacted to the ids a corpus uses (see the module doc)."""

    name: str
    tok: GgufTokenizer
    used: npt.NDArray[np.int64]  # full ids, sorted; compact id i <-> used[i]
    _encode: Any = field(repr=False)

    @classmethod
    def build(cls, name: str, texts: Iterable[tuple[str, str]]) -> Codec:
        """Over ``(prompt, answer)`` pairs: every id their sequences use, BOS and EOS."""
        tok = GgufTokenizer.load(name)
        encode = _LlamaTokenize(name)
        ids: set[int] = {i for i in (tok.bos_id, tok.eos_id) if i is not None}
        for prompt, answer in texts:
            ids.update(_sequence(encode, tok, prompt, answer)[0])
        return cls(name, tok, np.asarray(sorted(ids), dtype=np.int64), encode)

    @property
    def n_compact(self) -> int:
        """Used ids + the ``OTHER`` class (the last compact id)."""
        return int(self.used.shape[0]) + 1

    @property
    def n_unused(self) -> int:
        return self.tok.size - int(self.used.shape[0])

    def logit_offset(self) -> npt.NDArray[np.float32]:
        """Added to the compact logits in training: ``log(n_unused)`` on ``OTHER``."""
        out = np.zeros(self.n_compact, dtype=np.float32)
        out[-1] = math.log(max(1, self.n_unused))
        return out

    def encode_example(self, prompt: str, answer: str, *, prompt_loss_weight: float = 0.0
                       ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """``(compact tokens, loss mask)`` as :func:`moe2.tools.offline.experts.encode_example`
        (answer and EOS targets weigh 1, prompt targets ``prompt_loss_weight``)."""
        full, n_prompt = _sequence(self._encode, self.tok, prompt, answer)
        pos = np.searchsorted(self.used, np.asarray(full, dtype=np.int64))
        if np.any(pos >= self.used.shape[0]) or np.any(self.used[np.minimum(
                pos, self.used.shape[0] - 1)] != full):
            raise ValueError(f"{prompt!r} {answer!r} uses ids outside the compacted vocabulary")
        tokens = tuple(int(p) for p in pos)
        mask = (prompt_loss_weight,) * (n_prompt - 1) + (1.0,) * (len(full) - n_prompt)
        return tokens, mask

    def export(self, weights: Mapping[str, npt.NDArray[np.float32]]
               ) -> dict[str, npt.NDArray[np.float32]]:
        """Compact weights (llama.cpp naming) -> full-vocabulary weights (the exact scatter of
        the module doc)."""
        out = dict(weights)
        emb, head = weights["token_embd.weight"], weights["output.weight"]
        n_used = int(self.used.shape[0])
        full_emb = np.empty((self.tok.size, emb.shape[1]), dtype=np.float32)
        full_emb[:] = emb[:n_used].mean(axis=0)
        full_emb[self.used] = emb[:n_used]
        full_head = np.empty((self.tok.size, head.shape[1]), dtype=np.float32)
        full_head[:] = head[n_used]
        full_head[self.used] = head[:n_used]
        out["token_embd.weight"] = full_emb
        out["output.weight"] = full_head
        return out

    def fingerprint(self) -> str:
        """What the manifest records for the vocabulary: llama.cpp's name and size."""
        return f"{self.name}:{self.tok.size}"

    def close(self) -> None:
        self._encode.close()


def _sequence(encode: _LlamaTokenize, tok: GgufTokenizer, prompt: str, answer: str
              ) -> tuple[list[int], int]:
    """Full ids of prompt + answer + EOS, and how many are the prompt's: the agent's
    ``ScoreAnswer`` rule (prompt + " " + answer tokenised together, cut at the prompt's
    tokens; the answer alone when they merged)."""
    head = encode(prompt, add_bos=True)
    spaced = not answer or answer[0].isspace() or not prompt or prompt[-1].isspace()
    text = answer if spaced else " " + answer
    full = encode(prompt + text, add_bos=True)
    body = full[len(head):] if full[:len(head)] == head else encode(text, add_bos=False)
    if tok.eos_id is None:
        raise ValueError(f"the {tok.name} vocabulary has no EOS token")
    return [*head, *body, tok.eos_id], len(head)
