# aqsh image: the wheel built in one stage, installed into a slim runtime in the next.
# No Docker engine in CI: tests/cli/test_wheel.py runs what this image runs (the wheel in a
# fresh virtualenv, `python -m aqsh worker` and `api` outside the source tree).
#
#   docker build -t aqsh .
#   docker run -e AQSH_REDIS_ADDR=redis:6379 aqsh            # serve (API and worker)
#   docker run -e AQSH_REDIS_ADDR=redis:6379 aqsh worker     # or: api

FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir "hatchling>=1.21"
COPY pyproject.toml README.md ./
COPY aqsh ./aqsh
COPY lua ./lua
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .

FROM python:3.11-slim
# tini as PID 1: forwards SIGTERM to aqsh and reaps the orphans scripts leave behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin aqsh
# The examples, so the image runs as is; mount your own tasks.yaml and scripts over them.
COPY examples/tasks.yaml /etc/aqsh/tasks.yaml
COPY examples/scripts /tasks
ENV AQSH_BIND=0.0.0.0:8080 \
    AQSH_TASKS_CONFIG=/etc/aqsh/tasks.yaml \
    AQSH_TASKS_DIR=/tasks \
    AQSH_RESULTS_DIR=/tmp/aqsh \
    AQSH_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/aqsh
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('AQSH_BIND', ':8080').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health/live', timeout=4)"]
ENTRYPOINT ["tini", "--", "python", "-m", "aqsh"]
CMD ["serve"]
