# Two entry points: `make demo` and `make test`. Both create .venv and install into it,
# always through constraints.txt so torch stays at the pinned CPU build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test install browser clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[demo,test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/secateurs demo

# The report test renders HTML in headless Chromium: installed here when missing and possible
# (root and apt-get); otherwise that one test skips and says why. Never fails the build.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed: the report rendering test will skip"

test: install browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
