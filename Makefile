# Quick start: `make demo` (optimize the bundled MLP) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT := out

.PHONY: demo test bench models clean

$(BIN)/denseflex-onnx: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/denseflex-onnx
	mkdir -p $(OUT)
	$(BIN)/denseflex-onnx optimize models/mnist_mlp.onnx --data models/mnist_mlp_val.npz \
		--latency -30% --max-accuracy-drop 1 --input-shape x:1x784 -o $(OUT)/mnist_mlp.small.onnx --force

test: $(BIN)/denseflex-onnx
	$(BIN)/python -m pytest -q

bench: $(BIN)/denseflex-onnx
	$(BIN)/python bench/run.py

clean:
	rm -rf $(OUT) .pytest_cache
