"""The GGUF engine: llama.cpp through llama-cpp-python's C API, many sessions in one context.

Every session owns one KV-cache sequence (``seq_id``) of a single llama.cpp context created with
``n_seq_max = max_sessions``, each sequence in its own KV stream of ``n_ctx`` cells, not one
unified buffer: a unified buffer's cost grows with its total size, measured here on the 51M
bench model as +0.4 ms a step (3 %) at 16 x 256 cells and +1.5 ms (11 %) at 16 x 2048 with a
single session open. The price of streams: llama.cpp batches the sequences of one decode call
into one ubatch (one pass over the weights) only where their ids are consecutive and
ascending -- 4 sessions with ids 0,2,4,6 took twice as long as 0,1,2,3 -- so ``decode`` orders
its jobs by ``seq_id`` and the session table hands out the lowest free id.
A step decodes only the newly appended
token at the session's next position, so the history is never processed again; steps of several
sessions due in the same tick are decoded in ONE ``llama_decode`` call (one batch), which is
also the window over which the energy meter's delta is shared.

All methods here are blocking and must run off the event loop (the daemon calls them through
its engine thread). The class is not thread-safe; the daemon serialises calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

# general.file_type values (llama_ftype) -> name, for the status message
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}


class EngineError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What the agent serves. ``n_vocab``, ``pieces`` and ``vocab_fp`` describe the vocabulary
    *family*: the model's tokens without the trailing padding (see :func:`family_size`);
    ``n_vocab_model`` counts the padding too."""

    name: str
    quant: str
    n_vocab: int
    n_ctx: int
    bos_id: int
    eos_id: int
    vocab_fp: str
    chat_template: str | None
    n_params: int
    pieces: tuple[bytes, ...]
    #: every end-of-generation token (EOS, EOT, <|im_end|>, ...: llama_vocab_is_eog)
    eog_ids: tuple[int, ...] = ()
    n_vocab_model: int = 0


@dataclass(frozen=True)
class DecodeJob:
    """Append ``tokens`` to sequence ``seq_id`` starting at position ``pos0``."""

    seq_id: int
    tokens: Sequence[int]
    pos0: int


class Engine(Protocol):
    """What the agent daemon needs from a model runtime (a fake implements it in tests)."""

    info: ModelInfo
    evaluated_tokens: int

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]: ...

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str: ...

    def decode(self, jobs: Sequence[DecodeJob]) -> list[npt.NDArray[np.float32]]: ...

    def free(self, seq_id: int) -> None: ...

    def remove_from(self, seq_id: int, pos: int) -> None:
        """Drop the sequence's cached tokens at positions >= ``pos`` (a speculative one)."""
        ...

    def close(self) -> None: ...


#: llama_token_attr bits (llama.h)
ATTR_UNUSED = 1 << 1
#: the padding llama.cpp's converter appends to fill a model's embedding rows: ``[PAD151936]``
#: (USER_DEFINED in older conversions, UNUSED in newer ones)
PAD_RE = re.compile(rb"^\[PAD\d+\]$")


def family_size(texts: Sequence[bytes], attrs: Sequence[int]) -> int:
    """How many leading ids are the vocabulary proper: trailing padding tokens (UNUSED, or
    named ``[PADn]``) are cut. Qwen2.5-7B's GGUF (152,064 ids) and -3B's (151,936) keep the
    same tokens this way and only their padding differs: one family, fused over these ids, and
    a padding id is never sampled (the engine does not even return its logit)."""
    n = len(texts)
    while n > 0 and (attrs[n - 1] & ATTR_UNUSED or PAD_RE.match(texts[n - 1])):
        n -= 1
    return n


def vocab_fingerprint(pieces: Sequence[bytes], attrs: Sequence[int]) -> str:
    """Two experts may be fused only when this matches: same ids mean the same strings (over
    the family's ids, padding excluded)."""
    h = hashlib.sha256()
    h.update(len(pieces).to_bytes(4, "little"))
    for p, a in zip(pieces, attrs, strict=True):
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
        h.update(int(a).to_bytes(4, "little", signed=True))
    return h.hexdigest()[:32]


#: the largest magnitude by which the candidate search below widens (beyond it: every id)
_MAX_SPAN = 1e30


def softmax_topk(
    logits: npt.NDArray[np.float32], k: int, *, overwrite: bool = False
) -> tuple[npt.NDArray[np.int32] | None, npt.NDArray[np.float32], float]:
    """Temperature-1 softmax over the true logits; the top ``k`` ids (None = all) sorted by
    probability (ties: the lower id first), their probabilities, and the mass outside them.

    Float32 throughout, a handful of vectorised passes over the vocabulary and no temporary
    of its size (``overwrite=True`` lets it use ``logits`` itself as its buffer): at Qwen2's
    151,646 ids about 0.4 ms against 7 ms for a float64 softmax and an argpartition of it.
    Softmax is monotone, so the top ``k`` are chosen on the logits: the ids within a widening
    span of the largest logit until there are ``k`` of them, then a partition of those few.
    Probabilities are exp(x - max) / Σ exp(x - max), float32 (within ~1e-7 of float64)."""
    n = int(logits.shape[0])
    x: npt.NDArray[np.float32]
    if overwrite and logits.dtype == np.float32 and logits.flags.writeable:
        x = logits
    else:
        x = np.array(logits, dtype=np.float32)
    m = np.float32(x.max())
    ids: npt.NDArray[np.int32] | None = None
    top_logits: npt.NDArray[np.float32] | None = None
    if 0 < k < n:
        ids, top_logits = _top_k(x, m, k)
    np.subtract(x, m, out=x)
    np.exp(x, out=x)
    z = np.float32(x.sum())
    if ids is None or top_logits is None:
        x /= z
        return None, x, 0.0
    top: npt.NDArray[np.float32] = np.exp(top_logits - m) / z
    rest = max(0.0, 1.0 - float(top.sum(dtype=np.float64)))
    return ids, top, rest


def _top_k(
    x: npt.NDArray[np.float32], m: np.float32, k: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The ``k`` largest logits of ``x`` (max ``m``), ids sorted by logit descending then id."""
    span = 1.0
    while True:
        threshold = np.float32(m - span) if span < _MAX_SPAN else np.float32(-np.inf)
        count = int(np.count_nonzero(x >= threshold))
        if count >= k or span >= _MAX_SPAN:
            break
        span *= 4.0
    cand = np.flatnonzero(x >= threshold)
    vals = x[cand]
    if cand.shape[0] > k:
        # the k-th largest value; all above it, then the lowest ids equal to it
        kth = np.partition(vals, cand.shape[0] - k)[cand.shape[0] - k]
        above = np.flatnonzero(vals > kth)
        equal = np.flatnonzero(vals == kth)[: k - above.shape[0]]
        keep = np.sort(np.concatenate([above, equal]))
        cand, vals = cand[keep], vals[keep]
    order = np.lexsort((cand, -vals))
    return cand[order].astype(np.int32), vals[order]


class LlamaEngine:
    """llama.cpp model + one multi-sequence context."""

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int,
        max_sessions: int,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        kv_type: str = "f16",
        flash_attn: bool = False,
        verbose: bool = False,
    ) -> None:
        import llama_cpp as L
        from llama_cpp import _logger

        _logger.set_verbose(verbose)
        self._L = L
        if not os.path.isfile(model_path):
            raise EngineError(f"model file {model_path!r} does not exist")
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        model = L.llama_model_load_from_file(model_path.encode(), mparams)
        if not model:
            raise EngineError(f"llama.cpp could not load {model_path!r} (not a valid GGUF?)")
        self._model = model
        cparams = L.llama_context_default_params()
        self.n_ctx_per_session = n_ctx
        cparams.n_ctx = n_ctx * max_sessions
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = max_sessions
        cparams.kv_unified = False  # one stream per session: see the module docstring
        # Like llama-cpp-python: half the cores by default (llama.cpp's worker threads spin,
        # so oversubscribing a small box costs far more than it gains).
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        # Explicit, so distributions are reproducible against a plain llama-cpp-python Llama
        # (which also disables flash attention by default) and a float32 KV cache can be asked
        # for where exactness matters more than memory (logit checks, calibration).
        cparams.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        kv_ggml = {"f16": L.GGML_TYPE_F16, "f32": L.GGML_TYPE_F32, "q8_0": L.GGML_TYPE_Q8_0}
        if kv_type not in kv_ggml:
            raise EngineError(f"kv_type must be one of {', '.join(kv_ggml)}, got {kv_type!r}")
        cparams.type_k = kv_ggml[kv_type]
        cparams.type_v = kv_ggml[kv_type]
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            L.llama_model_free(model)
            raise EngineError("llama.cpp could not create a context (out of memory?)")
        self._ctx = ctx
        self._mem = L.llama_get_memory(ctx)
        self._vocab = L.llama_model_get_vocab(model)
        self.n_batch = n_batch
        self._batch = L.llama_batch_init(n_batch, 0, 1)
        n_model = int(L.llama_vocab_n_tokens(self._vocab))
        attrs = [int(L.llama_vocab_get_attr(self._vocab, t)) for t in range(n_model)]
        texts = [L.llama_vocab_get_text(self._vocab, t) or b"" for t in range(n_model)]
        n_vocab = family_size(texts, attrs)
        if n_vocab == 0:
            L.llama_free(ctx)
            L.llama_model_free(model)
            raise EngineError(f"{model_path!r} has no tokens besides padding")
        attrs = attrs[:n_vocab]
        # logits are read for the family's ids only: padding is never sampled
        self._n_vocab = n_vocab
        self.evaluated_tokens = 0
        pieces = tuple(self._piece(t) for t in range(n_vocab))
        self._bos_text = self._piece(int(L.llama_vocab_bos(self._vocab)), special=True)
        ftype = self._meta("general.file_type")
        self.info = ModelInfo(
            name=self._meta("general.name") or os.path.basename(model_path),
            quant=FILE_TYPES.get(int(ftype), f"ftype{ftype}") if ftype and ftype.isdigit() else "",
            n_vocab=n_vocab,
            n_ctx=n_ctx,
            bos_id=int(L.llama_vocab_bos(self._vocab)),
            eos_id=int(L.llama_vocab_eos(self._vocab)),
            vocab_fp=vocab_fingerprint(pieces, attrs),
            chat_template=self._meta("tokenizer.chat_template") or None,
            n_params=int(L.llama_model_n_params(model)),
            pieces=pieces,
            eog_ids=tuple(t for t in range(n_vocab) if L.llama_vocab_is_eog(self._vocab, t)),
            n_vocab_model=n_model,
        )

    # ------------------------------------------------------------------ metadata
    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(4096)
        n = self._L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return ""
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]


    # ------------------------------------------------------------------ text
    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._L.llama_token * n_max)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, parse_special)
        if n < 0:
            n_max = -n
            buf = (self._L.llama_token * n_max)()
            n = self._L.llama_tokenize(
                self._vocab, data, len(data), buf, n_max, add_bos, parse_special
            )
        return list(buf[:n])

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        """Render with the GGUF's own Jinja chat template (as llama-cpp-python does)."""
        template = self.info.chat_template
        if not template:
            raise EngineError("this model has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        bos = self._bos_text.decode("utf-8", errors="replace")
        eos = self._piece(self.info.eos_id, special=True).decode("utf-8", errors="replace")
        rendered: str = env.from_string(template).render(
            messages=[{"role": r, "content": c} for r, c in messages],
            bos_token=bos,
            eos_token=eos,
            add_generation_prompt=True,
        )
        return rendered

    def bos_text(self) -> str:
        return self._bos_text.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ decoding
    def decode(self, jobs: Sequence[DecodeJob]) -> list[npt.NDArray[np.float32]]:
        """Decode every job's tokens (one batch when they fit) and return, per job, the logits
        after its last token. Raises :class:`EngineError` when llama.cpp refuses the batch."""
        L = self._L
        out: list[npt.NDArray[np.float32] | None] = [None] * len(jobs)
        # Flatten into (job index, token, pos, wants_logits) and feed n_batch at a time, in
        # seq_id order (see the module docstring); the logits go back in the jobs' order.
        flat: list[tuple[int, int, int, bool]] = []
        for j, job in sorted(enumerate(jobs), key=lambda jj: jj[1].seq_id):
            n = len(job.tokens)
            for i, tok in enumerate(job.tokens):
                flat.append((j, int(tok), job.pos0 + i, i == n - 1))
        b = self._batch
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start : start + self.n_batch]
            for i, (j, tok, pos, want) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = jobs[j].seq_id
                b.logits[i] = want
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc}")
            self.evaluated_tokens += len(chunk)
            for i, (j, _tok, _pos, want) in enumerate(chunk):
                if want:
                    ptr = L.llama_get_logits_ith(self._ctx, i)
                    out[j] = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()
        return [o if o is not None else np.zeros(self._n_vocab, np.float32) for o in out]

    def free(self, seq_id: int) -> None:
        self._L.llama_memory_seq_rm(self._mem, seq_id, -1, -1)

    def remove_from(self, seq_id: int, pos: int) -> None:
        if not self._L.llama_memory_seq_rm(self._mem, seq_id, pos, -1):
            raise EngineError(f"llama.cpp could not remove positions >= {pos} of sequence "
                              f"{seq_id}")

    def cached_positions(self, seq_id: int) -> int:
        """How many positions the sequence holds in the KV cache (tests: no speculative token
        is left behind)."""
        return int(self._L.llama_memory_seq_pos_max(self._mem, seq_id)) + 1

    def close(self) -> None:
        L = self._L
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
