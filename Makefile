# Two entry points: `make train` and `make test`. Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test gpu-wheels gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	rm -rf runs/tiny
	$(PY) -m longtrain launch --nproc 2 configs/tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# One GPU, under 8 minutes: compiled Triton tests, kernel and op benchmarks, a 32k training run, peak
# memory per N; appends a dated section to benchmarks/RESULTS.md. fla (chunk_gla baseline) is optional.
GPU_WHEELS = omegaconf==2.4.0 fla-core==0.6.0 pytest-xdist==3.8.0 execnet==2.1.1

gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl $(GPU_WHEELS)

GPU_PY ?= python3

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs wandb
