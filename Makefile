# ddk_fast: the two commands of the README are `make demo` and `make test`.
#
# Set-up creates .venv. torch is installed FIRST and pinned for every later pip call (a constraints file
# written from the installed version), so pip never swaps it for a CUDA build on a CPU machine.
# GPU users: `make demo TORCH=torch` (or any spec), or create .venv with your own torch first: an importable
# torch is kept as it is.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ddk_fast-installed

export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo demo-cached compare compare-pilot compare-akd compare-onpolicy compare-quick akd onpolicy test bench lint ext clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt setuptools wheel pybind11
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt --no-build-isolation -e ".[dev]"
	touch $@

# Rebuild the optional C++ sampler in place (setup does this too; DDK_FAST_BUILD_EXT=1 makes failure fatal).
ext: setup
	$(BIN)/python setup.py -q build_ext --inplace

# --overwrite: `make demo` again starts the demo run again (a run folder holding checkpoints is refused
# without --resume or --overwrite).
demo: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.train --config examples/demo.toml --overwrite

# AKD on the demo (examples/akd.toml): the teacher prompt search, then training with hidden states, a
# curriculum and the prompts on top of DDK.
akd: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.prompts --config examples/akd.toml
	$(BIN)/python -m ddk_fast.train --config examples/akd.toml --overwrite

# On-policy distillation on the demo (examples/onpolicy.toml): half of each step's sequences continued by the
# student and scored by the teacher, DDK choosing the domains of the prompts.
onpolicy: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.train --config examples/onpolicy.toml --overwrite

# "Does DDK help?": eight arms (best_fixed trains a grid of five fixed mixes) x five seeds in three settings
# (README; each setting one thread, OMP_NUM_THREADS=1). compare-pilot chose the DDK setting on val.
# one torch thread per comparison run (the measured settings; two comparisons can then share a 2-core box)
compare compare-pilot compare-akd: export OMP_NUM_THREADS = 1

compare: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.compare --config examples/compare.toml --out bench/results/compare/paper-like --work runs/compare-paper-like
	$(BIN)/python -m ddk_fast.compare --config examples/compare_large_gap.toml --out bench/results/compare/large-gap --work runs/compare-large-gap
	$(BIN)/python -m ddk_fast.compare --config examples/compare_hard_large.toml --out bench/results/compare/hard-large --work runs/compare-hard-large

compare-pilot: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.compare.pilot --config examples/compare_large_gap.toml --seeds 100,101 --out bench/results/compare/pilot/large-gap

# AKD's parts (hidden states, POCL curriculum, teacher prompts) alone and together, with and without DDK,
# against the uniform and ddk runs of `make compare` (reused when finished), in the three settings.
AKD_ARMS := uniform,ddk,akd_hidden,akd_curriculum,akd_prompts,akd,akd_ddk
compare-akd: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.compare --config examples/compare.toml --arms $(AKD_ARMS) --out bench/results/compare/paper-like-akd --work runs/compare-paper-like
	$(BIN)/python -m ddk_fast.compare --config examples/compare_large_gap.toml --arms $(AKD_ARMS) --out bench/results/compare/large-gap-akd --work runs/compare-large-gap
	$(BIN)/python -m ddk_fast.compare --config examples/compare_hard_large.toml --arms $(AKD_ARMS) --out bench/results/compare/hard-large-akd --work runs/compare-hard-large

# On-policy distillation (issue 21): λ = 0.5 and 1, with DDK and uniform mixing, against the off-policy ddk
# and uniform runs of `make compare` (reused when finished); every arm also gets the on-policy measure.
ONPOLICY_ARMS := ddk,uniform,onpolicy_ddk,onpolicy_uniform,onpolicy1_ddk,onpolicy1_uniform
compare-onpolicy: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	OMP_NUM_THREADS=1 $(BIN)/python -m ddk_fast.compare --config examples/compare.toml --arms $(ONPOLICY_ARMS) --out bench/results/compare/paper-like-onpolicy --work runs/compare-paper-like

compare-quick: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.compare --config examples/compare.toml --quick

# The demo trained from an offline teacher, with the cache's defaults: the teacher's top-64 of every sequence
# the run can draw (--epochs auto), cached once; then the run never runs the teacher. KIND=hidden caches the
# teacher's final hidden states + lm_head instead (exact dense loss; DTYPE=float32 reproduces the online run).
KIND  ?= topk
DTYPE ?= bfloat16
demo-cached: setup
	$(BIN)/python -m ddk_fast.demo --out .cache/demo
	$(BIN)/python -m ddk_fast.teacher_cache --config examples/demo.toml --kind $(KIND) --dtype $(DTYPE) --out .cache/demo/teacher_$(KIND)_$(DTYPE)
	$(BIN)/python -m ddk_fast.train --config examples/demo.toml --set model.teacher_cache=.cache/demo/teacher_$(KIND)_$(DTYPE) --set output.dir=runs/demo-cached-$(KIND) --overwrite

test: setup
	$(BIN)/ruff check ddk_fast tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest tests -q --durations=10
	$(BIN)/python -m pytest bench -q --benchmark-disable

bench: setup
	$(BIN)/python -m pytest bench -q --benchmark-only --benchmark-json=bench/results/latest.json

lint: setup
	$(BIN)/ruff check ddk_fast tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check ddk_fast tests bench

clean:
	rm -rf build *.egg-info ddk_fast/*.so .pytest_cache
