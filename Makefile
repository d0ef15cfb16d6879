# The two set-up commands of the README: `make demo` and `make test`.
# Everything installs into .venv, so a fresh clone needs nothing but python3.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU build that lies on this project's machines (any other
# request pulls a multi-GB CUDA build); onnxscript is for torch.onnx.export(dynamo=True).
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench bench-train clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[torch,test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	mkdir -p build
	$(BIN)/onnxprune models/resnet_fmnist.onnx --method fpgm --ratio 0.4 \
		--data models/fashion_mnist_val.npz --plan build/resnet_fmnist.plan.json \
		-o build/resnet_fmnist.pruned.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/run_e2e.py --prepare

# every training method on the full Fashion-MNIST (apt-get install dataset-fashion-mnist)
bench-train: $(STAMP)
	$(BIN)/python benchmarks/train_methods.py --epochs 4 --train-samples 60000 \
		--stem-stride 2 --swp-alpha 2e-3 --round-to 4 --clip-grad 5

clean:
	rm -rf build $(VENV) .pytest_cache
