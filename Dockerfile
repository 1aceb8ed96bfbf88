# syntax=docker/dockerfile:1

# ---- build stage: resolve and install the package into a self-contained venv ----
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# Only what `pip install .` needs (README.md is the project's `readme`).
COPY pyproject.toml README.md ./
COPY service/ ./service/
# Runtime dependencies only: no `embedded` / `test` / `lint` extras (no SecantusDB in the image).
RUN pip install --no-cache-dir .

# ---- runtime stage: slim base + venv, no build tooling, non-root ----
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH="/opt/venv/bin:${PATH}" \
    HOST=0.0.0.0 \
    PORT=8080 \
    MONGODB_DB=jobservice \
    DATA_DIR=/app/data

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY openapi.yaml /app/openapi.yaml
RUN mkdir -p /app/data && chown app:app /app/data

USER app

EXPOSE 8080

# slim has no curl: probe with the stdlib. urlopen raises on non-2xx/connection errors -> exit 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=3); sys.exit(0 if r.status == 200 else 1)"]

# SIGTERM (docker stop): stop accepting, finish in-flight requests within SHUTDOWN_TIMEOUT_S,
# close the database client, exit 0. HOST and PORT come from the environment above.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "serve"]
