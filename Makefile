# Mariana. `make run` starts the platform; `make test` runs the tests. Both set
# up what is missing first: the venv and pinned packages, redis-server (apt),
# generated protos, dev certificates (minted at start) and the default model.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR := .data/models/smollm2-135m-instruct
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup venv system-packages schemas bench-tools protos model run test test-unit test-e2e lint clean kubernetes bazel bazel-test image-tools image-debs images image-proof

setup: venv system-packages schemas protos model

venv: $(STAMP)

# torch first and alone, pinned to the CPU build on this machine's disk;
# DeepSpeed builds against the torch already installed (no build isolation).
$(STAMP): requirements.txt
	@echo "[setup] creating $(VENV) and installing pinned packages (first time: a few minutes) ..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on "torch==2.13.0"
	$(PY) -m pip install --progress-bar on --no-build-isolation -r requirements.txt
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'mariana-dev.pth').write_text('$(CURDIR)\n$(CURDIR)/gen\n')"
	touch $@

# redis-server for the platform; PostgreSQL for the tests that run the stores on it;
# prometheus for promtool, which checks the alert rules and scrape config.
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || missing="$$missing postgresql"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
		echo "[setup] installing$$missing with apt ..."; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

# Istio's CRD schemas (compiled, from the npm registry) for the test that
# validates the rendered Kubernetes + Istio manifests; Kubernetes' own schemas
# come with the kubernetes-validate wheel.
SCHEMAS := tools/istio-schemas
schemas: $(SCHEMAS)/node_modules/.installed

$(SCHEMAS)/node_modules/.installed: $(SCHEMAS)/package-lock.json
	@echo "[setup] installing Istio's schemas (npm ci) ..."
	cd $(SCHEMAS) && npm ci --no-audit --no-fund
	touch $@

# Kubernetes + Istio manifests of the mesh, from mesh/topology.yaml.
kubernetes: setup
	$(PY) -m mesh.kubernetes --out build/kubernetes

# Bazel: Debian's bazel-bootstrap (4.2.3, the newest that installs here; it
# fetches nothing: see WORKSPACE). Its Python is the project's venv, so
# `make setup` comes first. The server is shut down after the run.
bazel:
	@command -v bazel >/dev/null || { echo "[setup] installing Bazel (bazel-bootstrap) with apt ..."; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends bazel-bootstrap; }

bazel-test: setup bazel
	bazel test //... ; status=$$?; bazel shutdown; exit $$status

# Container images: the base layer's Debian packages are downloaded with apt,
# then Bazel builds each service's OCI image offline; tools/images/run_image.py
# unpacks one (umoci), starts it with runc and waits until it answers SERVING.
IMAGE_TOOLS := runc umoci skopeo
image-tools:
	@for tool in $(IMAGE_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then echo "[setup] installing$$missing with apt ..."; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; fi

image-debs:
	@mkdir -p .data/debs
	@echo "[setup] downloading the images' Debian packages (apt-get download) ..."
	cd .data/debs && packages=$$(grep -v '^#' ../../tools/images/debian-packages.txt) && \
		{ apt-get download $$packages || { $(SUDO) apt-get update -q && apt-get download $$packages; }; }

# Every service's image and the Kubernetes manifests that reference them by digest.
images: setup bazel image-tools image-debs
	bazel build //deploy:kubernetes ; status=$$?; bazel shutdown; exit $$status

# The proof `make test` runs: one image built, started from the image, SERVING.
image-proof: setup bazel image-tools image-debs
	bazel build //services/moderation:image ; status=$$?; bazel shutdown; [ $$status -eq 0 ]
	$(PY) -m tools.images.run_image moderation

# Only for the load benchmarks under bench/: wrk drives HTTP/1.1, py-spy profiles.
bench-tools: $(STAMP)
	@command -v wrk >/dev/null || { echo "[bench] installing wrk with apt ..."; $(SUDO) apt-get install -y -q wrk; }
	$(PY) -m pip install --progress-bar on "py-spy==0.4.3"

protos: $(STAMP)
	$(PY) tools/genproto.py
	$(VENV)/bin/buf lint

model: $(STAMP)
	$(PY) -m services.inference.model_prep --out $(MODEL_DIR)

run: setup
	$(PY) -m launcher

test: setup lint bazel-test image-proof
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m "not e2e"

lint: $(STAMP) protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

clean:
	rm -rf gen build .data/pki .data/envoy .data/logs
