"""llama-cpp-python's high-level `Llama`, with its weights in plain CPU buffers.

`Llama` always lets llama.cpp move weights into its extra CPU buffer types (repacked layouts,
and Intel AMX tiles where the CPU has them), and offers no setting against it. On a CPU with
AMX, llama.cpp 0.3.36 then crashes (SIGSEGV in llama_decode) on Gemma 3, with or without a
LoRA, so every `Llama` that decodes here is made through `plain_llama`. The GGUF backend's
own runtime keeps plain buffers for the same reason (`RuntimeConfig.repack_weights`), so the
two also compute alike.
"""

from __future__ import annotations

from typing import Any


def plain_llama(model_path: str, **kwargs: Any) -> Any:
    """`Llama(model_path, **kwargs)` with `use_extra_bufts` off."""
    import llama_cpp.llama_cpp as lib  # compiled extension: imported only when used
    from llama_cpp import Llama

    defaults = lib.llama_model_default_params

    def plain_params() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = plain_params  # read by Llama.__init__ at call time
    try:
        return Llama(model_path, **kwargs)
    finally:
        lib.llama_model_default_params = defaults
