# One command for the main job (`make demo`), one for the tests (`make test`); both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the CPU wheel of torch (an unpinned torch pulls a CUDA build of several GB); GPU users keep theirs.
CPU_TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: installing the default torch"; \
	else $(BIN)/pip install --quiet "$(CPU_TORCH)"; fi
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo's own folder, replaced at every run (a run of your own refuses a folder that holds another run's files).
demo: $(STAMP)
	$(BIN)/python scripts/train.py --output_dir outputs/demo --overwrite_output_dir true $(ARGS)

# Tiny models: one thread per process is faster than two threads fighting over the cores (and several test
# processes run at once in the distributed tests).
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check txformer scripts tests benchmarks
	$(BIN)/ruff format --check txformer scripts tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

.PHONY: benchmark benchmark-reversible compare

# Speed and memory against length of every attention kind (docs/benchmark.md); ARGS="--lengths ..." to change it.
benchmark: $(STAMP)
	$(BIN)/python scripts/benchmark.py $(ARGS)

# Peak training memory of 1 and 8 layers, ordinary and reversible, of every kind at 4,096 events
# (docs/reversible_layers.md); about 6 minutes on 2 cores.
benchmark-reversible: $(STAMP)
	$(BIN)/python scripts/benchmark_reversible.py $(ARGS)

# Trains every attention kind at several contexts and seeds, writes docs/results.md (resumable: rerun to continue).
compare: $(STAMP)
	$(BIN)/python scripts/compare.py $(ARGS)
