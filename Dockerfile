# CPU image of the attention service: `docker compose up --build`, then http://127.0.0.1:8000/docs
FROM python:3.11-slim

# The service runs as this unprivileged user (numeric below, so runAsNonRoot can verify it).
RUN useradd --system --no-log-init --uid 10001 app

# torch is pinned (as in pyproject.toml) and comes from a CPU wheel index: PyPI's default torch
# wheel pulls a multi-GB CUDA build. Point this at a mirror with --build-arg TORCH_INDEX_URL=...
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layers, rebuilt only when the torch pin or pyproject.toml changes:
# torch alone first, then the rest, as pyproject.toml lists them.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0

COPY pyproject.toml ./
RUN python -c 'import tomllib; \
        project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
        print("\n".join(project["dependencies"]))' > requirements.txt \
    && pip install --no-cache-dir --requirement requirements.txt

# The code: a plain (non-editable) install, nothing left to resolve.
COPY README.md ./
COPY attention/ attention/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps .

# Run from an empty directory, so the code is imported from site-packages, not from /app.
WORKDIR /srv
USER 10001
EXPOSE 8000
# Healthy once ready: the port opens before the warm-up, which /readyz (503 until then) tracks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# --no-access-log: the service logs each request itself, as one JSON line with its request id;
# uvicorn's own text line on top cost ~20% of small-request throughput.
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
