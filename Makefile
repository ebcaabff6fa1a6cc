# The README's commands. Each creates .venv (pinned torch, the project and its tools) when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Pinned: pip takes these from the machine's disk; an unpinned torch would download several GB.
# lightning, accelerate, timm: tests/test_frameworks.py runs segclip.patch_torch() inside them.
DEPS   := torch==2.14.1 torchvision==0.29.1 ninja pybind11 "setuptools>=70" wheel \
          pytest hypothesis tqdm matplotlib lightning==2.6.6 accelerate==1.15.0 timm==1.0.29
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)
export MAX_JOBS ?= 2

.PHONY: run test bench build clean

# Trains lraspp_mobilenet_v3_large on the synthetic VOC-format dataset (generated once into
# $SEGCLIP_CACHE or ~/.cache/segclip) with fused clipping, evaluates, plots; the run goes to runs/.
run: $(VENV)/.built
	$(PY) -m segclip train --model lraspp_mobilenet_v3_large --data synthetic --clip fused

test: $(VENV)/.built
	$(PY) -m pytest -q tests

bench: $(VENV)/.built
	$(PY) benchmarks/bench_clip.py

build: $(VENV)/.built

# The virtual environment, the pinned dependencies, and the package itself installed in editable
# mode (console script `segclip`) without compiling anything: the kernels are built by the next rule.
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	SEGCLIP_NO_EXTENSIONS=1 $(PY) -m pip install -q --no-build-isolation --no-deps \
		--config-settings editable_mode=compat -e .
	touch $@

# Builds the kernels in place; ninja rebuilds only what changed.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

clean:
	rm -rf build segclip/*.so *.egg-info $(VENV)/.built
