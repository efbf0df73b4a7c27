"""Small llama-architecture GGUF "experts" with a real tokenizer, built entirely offline.

Used by tests, ``moe2 make-experts`` and ``moe2 bench``: nothing here downloads anything.

* :func:`synthetic_corpus` generates deterministic English-ish sentences (arithmetic Q/A,
  capitals, word reversal, colours, ...); :func:`train_spm_tokenizer` trains a real SentencePiece
  BPE model with byte fallback on it, in memory. :func:`default_vocab` is the vocabulary the
  test experts share; :func:`other_vocab` is a different one of the same size (mismatch path).
* :class:`LlamaSpec` + :func:`random_weights` define a model in llama.cpp tensor naming and
  layout; :func:`write_gguf` writes it with the ``gguf`` package (architecture ``llama``).
* :func:`reference_logits` is a plain float64 numpy forward pass that follows llama.cpp's
  conventions for ``LLM_ARCH_LLAMA`` (rope type NORM: adjacent pairs ``(x[2i], x[2i+1])`` are
  rotated). It is the specification any other implementation of these experts must match.
* :func:`make_test_experts`, :func:`make_mismatch_expert` and :func:`make_large_expert` write
  ready-made fleets.

Layout convention: every 2-D weight is stored as a numpy array of shape ``(out, in)`` and applied
as ``y = W @ x`` (the GGUF writer reverses the shape, so llama.cpp sees ``ne = [in, out]``).
Attention projections are head-major: row ``h * head_dim + d`` is dimension ``d`` of head ``h``.

Needs ``numpy``, ``gguf`` and ``sentencepiece`` (the ``train`` or ``dev`` extras).

Checked against llama-cpp-python 0.3.36 (``tests/test_gguf_models.py``):

* f32 GGUF with ``type_k=type_v=GGML_TYPE_F32``: logits agree with :func:`reference_logits` to
  about 4e-6. llama.cpp's default f16 KV cache alone moves them by up to ~5e-3.
* Read logits with ``llama_get_logits_ith(llm.ctx, -1)``; ``Llama.scores`` stays zero unless the
  model is opened with ``logits_all=True``.
* llama.cpp's SPM tokenizer equals ``SpmVocab.encode`` (with BOS) on corpus text and fuzzed
  strings (tabs, CR, NBSP, CJK, emoji via byte fallback). ``Llama.detokenize`` strips the dummy
  prefix space only when the token list starts with BOS, and a byte-fallback token alone is a
  partial UTF-8 sequence: stream text by decoding accumulated bytes.
"""


from moe2.tools.models.fixtures import (
    SIMPLE_CHAT_TEMPLATE,
    SMALL_SHAPES,
    ExpertFile,
    make_large_expert,
    make_mismatch_expert,
    make_test_experts,
)
from moe2.tools.models.gguf_io import GgufModel, read_gguf, write_gguf
from moe2.tools.models.llama import (
    FileType,
    LlamaSpec,
    random_weights,
    reference_logits,
    round_weights,
)
from moe2.tools.models.text import synthetic_corpus
from moe2.tools.models.vocab import (
    DEFAULT_VOCAB_SIZE,
    SpmVocab,
    default_vocab,
    fingerprint_tokens,
    other_vocab,
    train_spm_tokenizer,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "SIMPLE_CHAT_TEMPLATE",
    "SMALL_SHAPES",
    "ExpertFile",
    "FileType",
    "GgufModel",
    "LlamaSpec",
    "SpmVocab",
    "default_vocab",
    "fingerprint_tokens",
    "make_large_expert",
    "make_mismatch_expert",
    "make_test_experts",
    "other_vocab",
    "random_weights",
    "read_gguf",
    "reference_logits",
    "round_weights",
    "synthetic_corpus",
    "train_spm_tokenizer",
    "write_gguf",
]
