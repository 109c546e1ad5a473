# Two entry points: `make demo` and `make test`. Both create .venv and install into it,
# always through constraints.txt so torch stays at the pinned CPU build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[demo,test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/secateurs demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
