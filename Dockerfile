# Not built in CI (no Docker engine there); kept minimal and conventional.
FROM python:3.11-slim
RUN useradd --uid 10001 --create-home aqsh
WORKDIR /app
COPY pyproject.toml README.md ./
COPY aqsh ./aqsh
COPY lua ./lua
RUN pip install --no-cache-dir .
COPY examples/scripts /tasks
USER aqsh
ENTRYPOINT ["aqsh"]
CMD ["serve"]
