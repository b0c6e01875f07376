# mergejob: every target uses the virtual environment at .venv (made by `make install`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
export MERGEJOB_CACHE ?= $(HOME)/.cache/mergejob

.PHONY: install test test-fast lint format demo clean kube-binaries mergekit-venv

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# torch is pinned first so the CPU wheel on disk is used, never a CUDA build.
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"

# The real-Kubernetes tests' binaries are built once (minutes) into $(MERGEJOB_CACHE), and
# so is mergekit's venv (about 3 minutes); with them in place the tests that need them must
# run, never skip.
test: kube-binaries mergekit-venv lint
	$(BIN)/hadolint image/Dockerfile
	MERGEJOB_REQUIRE_KUBE=1 MERGEJOB_REQUIRE_MERGEKIT=1 MERGEKIT_VENV=$(MERGEKIT_VENV) \
		$(BIN)/python -m pytest -q -ra
	# The container image: built here (buildah from a debootstrap base when no Docker engine
	# answers) and run on a tiny fixture against a host merge (image/test.sh).
	$(MAKE) image image-test

kube-binaries:
	bash tests/support/kube/build_k8s.sh

# mergekit 0.1.5, the peer `mergejob extract` is measured against
# (tests/test_extract_mergekit.py, bench/bench_extract.py): in a venv of its own, never in
# the project's. torch is pinned first so the CPU wheel on disk is used, never a CUDA build.
MERGEKIT_VENV ?= $(MERGEJOB_CACHE)/mergekit-venv
MERGEKIT_SPEC := mergekit==0.1.5 transformers==5.23.0 peft==0.21.2 accelerate==1.15.0
mergekit-venv: $(MERGEKIT_VENV)/.installed

$(MERGEKIT_VENV)/.installed:
	rm -rf "$(MERGEKIT_VENV)"
	$(PYTHON) -m venv "$(MERGEKIT_VENV)"
	"$(MERGEKIT_VENV)/bin/pip" install --quiet "$(TORCH_SPEC)"
	"$(MERGEKIT_VENV)/bin/pip" install --quiet "$(TORCH_SPEC)" $(MERGEKIT_SPEC)
	"$(MERGEKIT_VENV)/bin/mergekit-extract-lora" --help > /dev/null
	touch "$@"

test-fast:
	$(BIN)/python -m pytest -q -ra -m "not slow and not kube and not image"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo:
	$(BIN)/python examples/demo.py

clean:
	rm -rf demo-output .pytest_cache .ruff_cache .mypy_cache

# Container image: make image, make image-test (see image/Makefile.inc).
include image/Makefile.inc
