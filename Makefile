# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 2

.PHONY: demo check test test-fast gpu-check bench bench-peer bench-e2e clean-venv

$(STAMP): requirements.txt constraints.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==24.3.1
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python recipes/pretrain_tiny.py

# pytest-xdist: JOBS worker processes (one per core), one thread each; --dist loadfile keeps each test file on one
# worker, so a module's fixtures (the reference runs several tests compare against) run once
JOBS    ?= 2
PYTEST  := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile

# the fast tier, before every commit: everything not marked slow (no DeepSpeed launches, no training runs)
check: $(STAMP)
	$(PYTEST) -m "not slow" --durations=10

test-fast: check

# the whole suite (what .ci/run runs), slowest tests listed at the end
test: $(STAMP)
	$(PYTEST) --durations=20

# the first thing to run on a GPU machine (minutes on one H100 / H200): the machine, every Triton kernel against
# its reference in fp32 / bf16 at the ViT-B/16 and ViT-H/14 shapes, 30 timed pretraining steps per backend pair;
# without CUDA a dry mode (tiny shapes, the interpreter) that lists what it skipped
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json

# kernel microbenchmarks: a table + JSON, then pytest-benchmark (on CPU: reference paths, small batch);
# first every Triton kernel compiled for sm_80 / sm_90 (no GPU needed): registers, spills, shared memory
bench: $(STAMP)
	$(BIN)/python -m benchmarks.compile_table --check --out benchmarks/results/kernels_resources.json
	$(BIN)/python -m benchmarks.kernels_table --out benchmarks/results/kernels.json
	$(BIN)/python -m benchmarks.attention_table --out benchmarks/results/attention.json
	$(BIN)/python -m pytest benchmarks/test_bench_kernels.py --benchmark-enable -q

# the plain-PyTorch peer of benchmarks/e2e.py: lightly's I-JEPA (pinned, installed, never vendored) in its own
# environment, on this project's torch / torchvision / timm pins (constraints.txt)
PEER := .venv-peer
$(PEER)/.installed: constraints.txt
	test -x $(PEER)/bin/python || $(PY) -m venv $(PEER)
	$(PEER)/bin/python -m pip install --quiet --upgrade pip==24.3.1
	$(PEER)/bin/python -m pip install --quiet lightly==1.6.0 timm torch torchvision -c constraints.txt
	touch $@

bench-peer: $(PEER)/.installed

# our training step against the peer, alternating (tables + benchmarks/results/e2e.json)
bench-e2e: $(STAMP) $(PEER)/.installed
	$(BIN)/python -m benchmarks.e2e

clean-venv:
	rm -rf $(VENV)
