# Every target installs what it needs into .venv first, at the exact versions of constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[zoo,test]"
	touch $(STAMP)

.PHONY: install demo test bench bench-accuracy
install: $(STAMP)

demo: $(STAMP)  ## quantize the embedded EfficientNet-Lite0 (no user files; `zeroquant eval` measures it, see README)
	mkdir -p out
	$(BIN)/zeroquant quantize zoo:efficientnet_lite0 -o out/efficientnet_lite0-w8a8.onnx \
		--float-output out/efficientnet_lite0-fp32.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## W8A8 against onnxruntime's quantizers (~16 min)
	$(BIN)/python benchmarks/run.py

bench-accuracy: $(STAMP)  ## the low-bit / mixed-precision and ablation tables (about 1.5 h on 2 cores)
	$(BIN)/python benchmarks/accuracy.py lowbit
	$(BIN)/python benchmarks/accuracy.py ablation
