# Set-up and the two commands the README opens with. Everything installs into .venv.
# torch is pinned to the CPU build this kind of machine carries on disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP    = $(VENV)/.installed
# litdata declares torchvision, and pip would meet that by replacing the pinned CPU torch
# with a CUDA build (PyPI's torchvision for this torch is CUDA-only): litdata goes in
# without its requirements, which the `litdata` extra lists instead (torchvision aside,
# only its image/video serializers use it). The import check makes a broken install loud.
LITDATA ?= litdata==0.2.76

.PHONY: demo test test-faults lint bench bench-io bench-long clean data

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test,litdata]'
	$(BIN)/pip install -q --no-deps "$(LITDATA)"
	$(BIN)/python -c "import es_pipe.litdata_source"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/es-pipe demo

test: $(STAMP) data
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

test-faults: $(STAMP)
	$(BIN)/pytest -q -m faults

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The side-by-side training benchmark (about 20 minutes on 2 CPU cores). Fashion-MNIST comes
# from Debian's dataset-fashion-mnist package (installed here with apt-get when missing).
FMNIST   = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
BENCHOUT ?= benchmarks/results
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# Real data for the example tests; where apt is unavailable they skip, saying why.
data:
	@[ -e $(FMNIST) ] || $(MAKE) -s $(FMNIST) || \
		echo "note: dataset-fashion-mnist not installed; its example test will be skipped"

bench: $(STAMP) $(FMNIST)
	$(BIN)/python benchmarks/bench_stage.py --out $(BENCHOUT)
	$(BIN)/python benchmarks/bench_train.py --task lm --train-samples 2048 --window 64 \
		--epochs 3 --seeds 0,1,2 --out $(BENCHOUT) \
		--methods uniform,uniform@0.34,uniform@0.67,random,sb,es,es-history,es-bf16,es-wide,eswp,infobatch
	for task in fmnist fmnist-noisy; do \
		$(BIN)/python benchmarks/bench_train.py --task $$task --tune --lrs 1e-3,3e-3 \
			--train-samples 6000 --epochs 3 --seeds 0,1,2 --out $(BENCHOUT) \
			--methods uniform,uniform@0.34,uniform@0.67,random,loss,sb,es,es-history,eswp,infobatch \
			|| exit 1; \
	done

# Issue 14's table: every I/O and selection measure as a ratio to its limit, in one process,
# interleaved, median of 7 (10-20 minutes on 2 cores); BENCHIO=--quick for a < 3 minute run.
BENCHIO ?=
bench-io: $(STAMP)
	$(BIN)/python benchmarks/bench_io.py $(BENCHIO) --out $(BENCHOUT)/bench_io.md

# The long benchmark of issue 12: near convergence, 3 seeds, the configuration search. Hours
# on 2 cores; each task appends one JSON line per run to $(BENCHOUT)/long/{task}_runs.jsonl,
# so `make bench-long` after an interruption continues where it stopped (--resume).
LONGOUT ?= $(BENCHOUT)/long
LONG_METHODS = uniform,uniform@0.33,uniform@0.5,uniform@0.67,random,infobatch,es,es-history,\
es-history@0.25,es-history@0.75,eswp,es-prune@0.5,es-prune@0.8,es-prune-s3@0.5,es-prune-s3@0.8

bench-long: $(STAMP) $(FMNIST)
	$(BIN)/python benchmarks/bench_train.py --task lm --train-samples 4096 --window 64 \
		--epochs 8 --evals-per-epoch 2 --seeds 0,1,2 --out $(LONGOUT) --resume \
		--methods $(LONG_METHODS)
	for task in fmnist fmnist-noisy; do \
		$(BIN)/python benchmarks/bench_train.py --task $$task --train-samples 10000 \
			--epochs 15 --seeds 0,1,2 --out $(LONGOUT) --resume \
			--methods $(LONG_METHODS) || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info
