# Two commands do all the setup on a fresh machine: `make run` (the main job: the tiny TNL trains on an 8-device
# CPU mesh) and `make test` (the suite).
# Both build .venv with Python 3.12 (python3.12 on PATH, else pyenv's 3.12.x) and install the pinned stack.

# (pyenv's python3.12 shim exists even when 3.12 is not selected, so each candidate must actually run.)
PYTHON312 := $(shell for p in $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 $$(command -v python3.12); do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or put python3.12 on PATH" >&2; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m train

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV)
