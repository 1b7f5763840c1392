# Two commands, each sets itself up on a fresh machine:
#   make demo   -- train, plot, checkpoint, resume, sample, log-likelihood
#   make test   -- every test in one pytest run (tests, hypothesis property tests, doctests)
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test lint bench venv fuzz soak

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints.txt torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -e ".[dev,metrics,tensorboard,mlflow,wandb]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VPY) examples/demo.py --out demo_output

# two workers, one file per worker at a time (module fixtures share a file's launches)
test: $(VENV)/.installed
	$(VPY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check src

bench: $(VENV)/.installed
	set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(VPY) $$b; done

# The repeated-launch soak: 20 launches per DDP exit mode and of the background sharded-save
# exit (the default run does 2 of each)
soak: $(VENV)/.installed
	NNH_SOAK=1 $(VPY) -m pytest -q -p no:cacheprovider tests/test_ddp_exit.py \
		tests/test_sharded_async.py::test_clean_exit_with_a_background_save_pending_repeated

# The checkpoint fuzzer, long: NNH_FUZZ_EXAMPLES=20000 make fuzz (random, not the CI sequence)
fuzz: $(VENV)/.installed
	NNH_FUZZ_EXAMPLES=$${NNH_FUZZ_EXAMPLES:-20000} NNH_FUZZ_DERANDOMIZE=$${NNH_FUZZ_DERANDOMIZE:-0} \
		$(VPY) -m pytest -q -s -p no:cacheprovider property_tests/test_checkpoint_fuzz.py
