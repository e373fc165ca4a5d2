# Two commands on a fresh machine: `make demo` (the main job on built-in data) and `make test`.
# Each creates or refreshes the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.0
STAMP := $(VENV)/.installed
SOURCES := setup.py pyproject.toml requirements-data.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*.h csrc/*/*.h)

.PHONY: setup demo test docs bench clean

setup: $(STAMP)

# --no-build-isolation: build the C++ extension against the torch installed here (an isolated
# build would fetch another multi-GB torch).
$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-data.txt
	touch $@

DEMO_ARGS ?=
demo: setup
	$(PY) -m fvvae_fast demo $(DEMO_ARGS)

# torchcodec's decoder is tested and timed on the FFmpeg inside PyAV's wheel (tests/pyav_ffmpeg.py): no
# system FFmpeg needed.
FFMPEG_LINKS := $(VENV)/ffmpeg
WITH_FFMPEG := LD_LIBRARY_PATH=$(abspath $(FFMPEG_LINKS))$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}
$(FFMPEG_LINKS): $(STAMP)
	$(PY) tests/pyav_ffmpeg.py $@
	touch $@

test: setup $(FFMPEG_LINKS)
	TRITON_INTERPRET=1 $(WITH_FFMPEG) $(PY) -m pytest -q

# The documentation (docs/), warnings as errors: a broken reference fails. `make test` builds it too
# (tests/test_docs.py).
docs: setup
	$(PY) -m sphinx -b html -W -n -q docs docs/_build/html

bench: setup $(FFMPEG_LINKS)
	$(WITH_FFMPEG) $(PY) -m pytest bench -q --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info fvvae_fast/*.so demo_out docs/_build
