# Two commands do all the set-up on a fresh clone:
#   make train   train I3 (MODEL=...) on MNIST with its recipe from the change-log
#   make test    run the whole test suite
#   make quick   the fast loop while developing: every test not marked slow (no trainings)
# Both create the project's virtual environment (.venv) when it is missing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch and torchvision must come from the registry as a matching pair: a torchvision
# wheel loaded against a different torch build fails with "torchvision::nms does not exist".
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.2
# Where MNIST lives; empty means: MNISTKIT_DATA, else the per-user cache (downloaded if absent).
DATA_DIR ?=
EPOCHS ?= 15
MODEL  ?= I3

.PHONY: venv test quick train clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR)
	$(BIN)/python -m pip install --quiet -e '.[test,plot,export,ray,tensorboard]' $(TORCH_PAIR)
	$(BIN)/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

test: venv
	$(BIN)/python -m pytest -q

quick: venv
	$(BIN)/python -m pytest -q -m "not slow"

train: venv
	$(BIN)/mnistkit train $(MODEL) --epochs $(EPOCHS) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
