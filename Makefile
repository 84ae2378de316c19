# Quick start: `make demo` and `make test` (each sets up .venv/ first, once).
PY_BOOT ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Test files are spread over this many processes (a file stays in one: its fixtures are shared).
TEST_WORKERS ?= 2

.PHONY: venv demo test clean

venv: $(STAMP)

# The stamp depends on both requirement files: editing either reinstalls, a second run does not.
$(STAMP): requirements.txt requirements-vlmeval.txt
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# VLMEvalKit's metadata pins a CUDA torch; its real import-time needs are in requirements.txt.
	$(PY) -m pip install --quiet --no-deps -r requirements-vlmeval.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) demo_outputs
