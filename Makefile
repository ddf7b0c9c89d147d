# make demo : build .venv if needed, then run the whole SemiSAM demo (code/demo.py; DEMO_ARGS="--quick" etc.)
# make test : build .venv if needed, then run the test suite as the README says
# make venv : only build .venv (python3 -m venv + pip install -r requirements.txt; redone when requirements change)
PYTHON ?= python3
VENV ?= .venv
DEMO_ARGS ?=
TEST_ARGS ?= -q -ra

VENV_PY := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test venv help

help:
	@echo "make demo [DEMO_ARGS=...]   run code/demo.py (MT vs SemiSAM end to end; no download needed)"
	@echo "make test [TEST_ARGS=...]   run the test suite (cd code && python -m pytest tests)"
	@echo "make venv                   create $(VENV) and install requirements.txt"

venv: $(STAMP)

# the stamp records that requirements.txt was installed into this venv; a newer requirements.txt reinstalls
$(STAMP): requirements.txt
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -r requirements.txt
	touch $(STAMP)

demo: venv
	cd code && $(VENV_PY) demo.py $(DEMO_ARGS)

test: venv
	cd code && $(VENV_PY) -m pytest tests $(TEST_ARGS)
