# Two commands do all set-up on a fresh machine:
#   make run    creates/updates .venv, then runs the quickstart fine-tune
#   make test   creates/updates .venv, then runs the whole test suite
# The environment is rebuilt only when pyproject.toml or constraints.txt change.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.tunekit-installed
# torch is installed on its own, pinned, before anything that depends on it:
# on a CPU machine pip then takes the CPU wheel (never a multi-GB CUDA build),
# and the range in pyproject.toml accepts what is already there.
TORCH   ?= torch==2.13.0

# A second environment with the newest versions pyproject.toml's ranges allow (torch still pinned:
# an unpinned torch pulls a multi-GB CUDA build), so an upstream rename is caught the day it ships.
# It runs the tests that lean on transformers' and PEFT's internals most: every adapter (LoRA,
# prefix, prompt, bottleneck; PEFT interop; generate()), the models glue and the fused loss.
LATEST  ?= .venv-latest
LATEST_TESTS ?= tests/adapters tests/tunekit/test_attention_interface.py tests/tunekit/test_models.py \
	tests/tunekit/test_apply_kernels.py

.PHONY: run test test-latest lint install clean bench

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

run: $(STAMP)
	$(VENV)/bin/tunekit finetune cookbook/quickstart.yaml

# import-linter reads packages from disk and cannot follow the editable install's
# package-dir mapping, so it checks a real (non-editable) build of the package.
lint: $(STAMP)
	rm -rf build/lint && $(PY) -m pip install -q --no-deps --no-compile --target build/lint . >/dev/null
	cd build/lint && PYTHONPATH=. ../../$(VENV)/bin/lint-imports --config ../../pyproject.toml

test: lint
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -m "not gpu" -q

test-latest:
	test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH)"
	@$(LATEST)/bin/python -m pip list --format=freeze 2>/dev/null \
		| grep -iE '^(torch|transformers|peft|accelerate|bitsandbytes|datasets|safetensors|pydantic)==' \
		| tr '\n' ' ' | sed 's/^/newest allowed versions: /'; echo
	TRITON_INTERPRET=1 $(LATEST)/bin/pytest -m "not gpu and not slow" -q $(LATEST_TESTS)

# bench/sft.py's peers (PEFT, TRL) are in the `test` extra that $(STAMP) installs (and in `bench`).
bench: $(STAMP)
	$(PY) bench/kernels.py
	$(PY) bench/train.py
	$(PY) bench/sft.py --json runs/bench-sft.json --markdown runs/bench-sft.md

clean:
	rm -rf $(VENV) $(LATEST) runs
