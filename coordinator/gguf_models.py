"""Moved to :mod:`moe2.shared.gguf_models` (both sides' tests and benches build models with it);
this alias keeps old imports working."""

from moe2.shared.gguf_models import *  # noqa: F403
from moe2.shared.gguf_models import __all__  # noqa: F401
