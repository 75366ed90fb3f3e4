# The two commands a newcomer needs: `make serve` and `make test`.
.PHONY: setup serve test test-unit lint model

setup: .venv/.setup-done

.venv/.setup-done: pyproject.toml scripts/setup.sh patches/llama.cpp/per-sequence-lora.patch
	bash scripts/setup.sh
	touch $@

model: setup
	.venv/bin/loraplex model prepare

serve: model
	.venv/bin/loraplex serve

test: model
	.venv/bin/python -m pytest -q -ra

test-unit: setup
	.venv/bin/python -m pytest -q -ra -m "not integration"

lint: setup
	bash scripts/lint.sh
