"""loraplex's server: the engine, its front ends and the fleet."""

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes (transformers and peft do) asks the
# `kernels` library for a gemm kernel from the Hugging Face hub and logs a warning, on every
# start, when it cannot have it (offline, or an unverified publisher). loraplex never uses
# that kernel: NF4 decode runs its own (engine/nf4.py). Their other warnings stay on.
for _noisy in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
