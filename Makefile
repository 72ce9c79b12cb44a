# The two commands a newcomer needs (README): `make demo` and `make test`.
# Both create .venv with pip; torch is pinned first so pip takes the local CPU build
# instead of resolving a multi-GB CUDA build (see README, "Install").
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train,test]" "$(TORCH)"  # train: torch & co (README, "Install"); pinned
	$(PY) -m pip install -q --no-deps "curvlinops-for-pytorch==3.0.1"  # its deps are in pyproject.toml (why: there)
	touch $@

.PHONY: setup demo test test-quick bench finetune guided guided-eval guided-grid
setup: $(VENV)/.installed

# The main job (README, "Quick start"): the whole loop on the embedded synthetic faces; rerunning resumes runs/demo.
demo: setup
	$(VENV)/bin/veil demo --out runs/demo

# The whole suite (what CI runs), on PYTEST_WORKERS processes (pytest-xdist; --dist loadscope keeps a module's
# tests, and its module fixtures, on one worker). The tiny models and exports the tests share are built once,
# beside the workers, and cached under ~/.cache/veil-tests by source (tests/helpers/disk_cache.py).
# `make test-quick` leaves out the minutes-long end-to-end tests (marked heavy) while developing.
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope

test-quick: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope -m "not slow and not gpu and not heavy"

# Private fine-tuning from a public start (docs/training.md): ~40 + ~40 minutes on a 2-core CPU.
# An earlier runs/dp_finetune (or runs/guide below) is never deleted: veil train refuses it; move it away first.
finetune: setup
	test -f runs/public/model/veil_model.json || $(VENV)/bin/veil train --config lightning_modules/configs/synthetic32_public.yaml --out runs/public
	$(VENV)/bin/veil train --config lightning_modules/configs/synthetic32_dp_finetune.yaml --out runs/dp_finetune
	$(PY) bench/sample_quality.py --checkpoint runs/dp_finetune --grid runs/dp_finetune/samples.png

# Classifier guidance (docs/training.md): the public label-free UNet (~40 min, shared with
# finetune) steered by a noise-conditional classifier trained at epsilon 10 (~50 min) on a 2-core CPU.
guided: setup
	test -f runs/public/model/veil_model.json || $(VENV)/bin/veil train --config lightning_modules/configs/synthetic32_public.yaml --out runs/public
	$(VENV)/bin/veil train-classifier --config lightning_modules/configs/classifier32_guidance.yaml --out runs/guide --progress
	$(PY) bench/sample_quality.py --checkpoint runs/public --classifier runs/guide --grid runs/guide/samples.png

bench: setup
	$(PY) bench/dp_step.py

# The editing evaluation of the private pipeline (docs/editing.md, "Measured"): the guided backend with the
# epsilon-10 DP classifier, and the same with a classifier trained without DP as the control (~6 min on a
# 2-core CPU, epsilon infinity on the private data: it counts in the dataset's account), then both at the
# four levels, naive and adaptive attackers (~15 min each on a 2-core CPU).
EVAL = --checkpoint runs/public --num-images 128 --adaptive-images 256 --steps 20 --threads 1
guided-eval: setup
	test -f runs/public/model/veil_model.json || $(VENV)/bin/veil train --config lightning_modules/configs/synthetic32_public.yaml --out runs/public
	test -f runs/guide/model/veil_model.json || $(VENV)/bin/veil train-classifier --config lightning_modules/configs/classifier32_guidance.yaml --out runs/guide --progress
	test -f runs/guide_np/model/veil_model.json || $(VENV)/bin/veil train-classifier --config lightning_modules/configs/classifier32_guidance.yaml --set dp.enabled=false --out runs/guide_np --progress
	test -f runs/judge/model/veil_model.json || $(VENV)/bin/veil train-classifier --config lightning_modules/configs/classifier32_guidance.yaml --set model.noise_conditional=false --set dp.noise_multiplicity=1 --out runs/judge --progress
	$(PY) bench/edit_eval.py $(EVAL) --classifier runs/guide --checker runs/judge --label "guided, DP classifier eps 10" --out runs/eval/guided
	$(PY) bench/edit_eval.py $(EVAL) --classifier runs/guide_np --checker runs/judge --label "guided, non-private classifier (control)" --out runs/eval/control
	$(PY) bench/edit_eval.py --combine runs/eval/guided/edit_eval.json runs/eval/control/edit_eval.json --out runs/eval

# The grid the levels were chosen from (docs/editing.md, "How the levels were chosen"); after guided-eval.
# Every guided run is checked by runs/judge (a DP classifier of clean images), never by its guide.
guided-grid: setup
	$(PY) bench/edit_eval.py $(EVAL) --classifier runs/guide --checker runs/judge --label "DP, invert" --levels low,medium,high,max --encodings invert --out runs/grid/invert
	$(PY) bench/edit_eval.py $(EVAL) --classifier runs/guide --checker runs/judge --label "DP, noise eps 0" --encodings noise --strengths 1.0,0.85 --epsilons 0 --out runs/grid/noise0
	$(PY) bench/edit_eval.py $(EVAL) --classifier runs/guide --checker runs/judge --label "DP, noise eps 1" --encodings noise --strengths 0.85,0.7 --epsilons 1 --out runs/grid/noise1
	$(PY) bench/edit_eval.py $(EVAL) --classifier runs/guide --checker runs/judge --label "DP, noise eps 2" --encodings noise --strengths 0.7,0.55 --epsilons 2 --out runs/grid/noise2
	$(PY) bench/edit_eval.py --combine runs/grid/invert/edit_eval.json runs/grid/noise0/edit_eval.json runs/grid/noise1/edit_eval.json runs/grid/noise2/edit_eval.json --out runs/grid
