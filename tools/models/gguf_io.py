"""Writing and reading the GGUF files of :mod:`.llama` models with the ``gguf`` package
(architecture ``llama``, SentencePiece vocabulary with byte-fallback tokens)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from moe2.tools.models.llama import FileType, FloatArray, LlamaSpec
from moe2.tools.models.real_vocab import GgufTokenizer
from moe2.tools.models.vocab import SpmVocab

logger = logging.getLogger(__name__)





def write_gguf(
    path: str | os.PathLike[str],
    spec: LlamaSpec,
    weights: Mapping[str, FloatArray],
    vocab: SpmVocab | GgufTokenizer,
    *,
    name: str,
    chat_template: str | None = None,
    file_type: FileType = "f32",
) -> None:
    """Write a llama-architecture GGUF (all matrices f32, or f16 with f32 norms).

    The file is written next to ``path`` and renamed into place, so readers never see half a file.
    """
    if vocab.size != spec.n_vocab:
        raise ValueError(f"vocabulary has {vocab.size} tokens, spec says {spec.n_vocab}")
    shapes = spec.tensor_shapes()
    if set(weights) != set(shapes):
        raise ValueError(f"weights do not match the spec: {sorted(set(weights) ^ set(shapes))}")
    for key, shape in shapes.items():
        if weights[key].shape != shape:
            raise ValueError(f"{key}: shape {weights[key].shape}, expected {shape}")

    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    ftype = gguf.LlamaFileType.ALL_F32 if file_type == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        writer.add_name(name)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(spec.n_vocab)
        writer.add_context_length(spec.n_ctx_train)
        writer.add_embedding_length(spec.dim)
        writer.add_block_count(spec.n_layers)
        writer.add_feed_forward_length(spec.ffn_dim)
        writer.add_head_count(spec.n_heads)
        writer.add_head_count_kv(spec.n_kv_heads)
        writer.add_layer_norm_rms_eps(spec.norm_eps)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(spec.rope_theta)

        if isinstance(vocab, GgufTokenizer):  # a real tokenizer, written as llama.cpp has it
            vocab.add_to(writer, chat_template)
        else:
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(list(vocab.tokens))
            writer.add_token_scores(list(vocab.scores))
            writer.add_token_types(list(vocab.types))
            writer.add_bos_token_id(vocab.bos_id)
            writer.add_eos_token_id(vocab.eos_id)
            writer.add_unk_token_id(vocab.unk_id)
            writer.add_add_bos_token(True)
            writer.add_add_eos_token(False)
            writer.add_add_space_prefix(True)
            if chat_template is not None:
                writer.add_chat_template(chat_template)

        for key in shapes:
            array = np.ascontiguousarray(weights[key], dtype=np.float32)
            if file_type == "f16" and array.ndim == 2:
                writer.add_tensor(key, array.astype(np.float16))
            else:
                writer.add_tensor(key, array)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, target)
    logger.debug("wrote %s (%s, %d params, %s)", target, name, spec.n_params, file_type)


@dataclass(frozen=True)
class GgufModel:
    """A llama GGUF read back with :func:`read_gguf` (weights as float32, ``(out, in)``)."""

    name: str
    spec: LlamaSpec
    weights: dict[str, FloatArray]
    vocab: SpmVocab
    chat_template: str | None


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    if field is None:
        raise KeyError(f"GGUF has no {key}")
    return field.contents()


def read_gguf(path: str | os.PathLike[str]) -> GgufModel:
    """Read a llama GGUF written by :func:`write_gguf` (f32/f16 tensors only)."""
    reader = gguf.GGUFReader(path)
    arch = str(_field(reader, "general.architecture"))
    if arch != "llama":
        raise ValueError(f"not a llama GGUF: {arch}")

    def num(key: str) -> float:
        value = _field(reader, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} is {value!r}")
        return value

    tokens = tuple(str(t) for t in _as_list(_field(reader, "tokenizer.ggml.tokens")))
    spec = LlamaSpec(
        n_vocab=len(tokens),
        dim=int(num("llama.embedding_length")),
        n_layers=int(num("llama.block_count")),
        n_heads=int(num("llama.attention.head_count")),
        n_kv_heads=int(num("llama.attention.head_count_kv")),
        ffn_dim=int(num("llama.feed_forward_length")),
        n_ctx_train=int(num("llama.context_length")),
        rope_theta=_f32_to_float(num("llama.rope.freq_base")),
        norm_eps=_f32_to_float(num("llama.attention.layer_norm_rms_epsilon")),
    )
    vocab = SpmVocab(
        tokens=tokens,
        scores=tuple(float(s) for s in _as_list(_field(reader, "tokenizer.ggml.scores"))),
        types=tuple(int(t) for t in _as_list(_field(reader, "tokenizer.ggml.token_type"))),
        bos_id=int(num("tokenizer.ggml.bos_token_id")),
        eos_id=int(num("tokenizer.ggml.eos_token_id")),
        unk_id=int(num("tokenizer.ggml.unknown_token_id")),
    )
    weights: dict[str, FloatArray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise ValueError(f"{tensor.name}: unsupported tensor type {tensor.tensor_type.name}")
        weights[tensor.name] = np.array(tensor.data, dtype=np.float32)
    template_field = reader.get_field("tokenizer.chat_template")
    template = None if template_field is None else str(template_field.contents())
    return GgufModel(
        name=str(_field(reader, "general.name")),
        spec=spec,
        weights=weights,
        vocab=vocab,
        chat_template=template,
    )


def _f32_to_float(value: float) -> float:
    """The shortest decimal that a float32 GGUF value stands for (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _as_list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


