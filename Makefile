# Every target installs what it needs into .venv first (pinned torch/torchvision from pyproject.toml).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)  ## quantize the embedded EfficientNet-Lite0 (no user files) and evaluate it if ../shared is present
	mkdir -p out
	$(BIN)/zeroquant quantize zoo:efficientnet_lite0 -o out/efficientnet_lite0-w8a8.onnx \
		--float-output out/efficientnet_lite0-fp32.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
