"""tasks.yaml ``concurrency`` and ``rate_limit``: checked at load with the file, line, task and
field of each mistake; the headers a submission carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from aqsh.engine import flow
from aqsh.errors import ConfigError
from aqsh.runner.spec import flow_headers, load_tasks


def write(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "deploy.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    return path


def test_limits_load_and_render_their_key_from_the_inputs(tmp_path: Path) -> None:
    path = write(tmp_path, """\
tasks:
  deploy:
    script: deploy.sh
    concurrency: {limit: 1, key: "{environment}"}
    rate_limit: {limit: 10, per: 1m, key: "{environment}/{canary}"}
    input:
      - {name: environment, env: ENVIRONMENT, required: true}
      - {name: canary, env: CANARY, type: bool, default: "false"}
  backup:
    script: deploy.sh
    concurrency: {limit: 2}
""")
    tasks = load_tasks(path, tmp_path).tasks
    spec = tasks["deploy"]
    assert spec.concurrency is not None
    assert (spec.concurrency.limit, spec.concurrency.key) == (1, "{environment}")
    assert spec.rate_limit is not None
    assert spec.rate_limit.per_s == 60
    headers = flow_headers(spec, {"environment": "prod", "canary": True})
    assert headers[flow.HEADER_CONCURRENCY_KEY] == "deploy:prod"
    assert headers[flow.HEADER_CONCURRENCY_LIMIT] == "1"
    assert int(headers[flow.HEADER_CONCURRENCY_SEQ]) > 0
    assert headers[flow.HEADER_RATE_KEY] == "deploy:prod/true"
    assert (headers[flow.HEADER_RATE_LIMIT], headers[flow.HEADER_RATE_PER_S]) == ("10", "60")
    # No key: the whole task type shares the limit.
    assert flow_headers(tasks["backup"], {})[flow.HEADER_CONCURRENCY_KEY] == "backup"


def test_mistakes_name_file_line_task_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, """\
tasks:
  a:
    script: deploy.sh
    concurrency: {limit: 0, key: "{environmnet}"}
    input:
      - {name: environment, env: ENVIRONMENT}
  b:
    script: deploy.sh
    rate_limit: {limit: 5, per: soon}
  c:
    script: deploy.sh
    rate_limit: {limit: 5}
    concurrency: {limit: 1, colour: blue}
""")
    with pytest.raises(ConfigError) as caught:
        load_tasks(path, tmp_path)
    details = caught.value.details
    expected = [
        (4, "task 'a': field 'concurrency.limit'", "at least 1"),
        (4, "task 'a': field 'concurrency.key'", "unknown inputs: 'environmnet'"),
        (9, "task 'b': field 'rate_limit.per'", "duration"),
        (12, "task 'c': field 'rate_limit.per'", "is required"),
        (13, "task 'c': field 'concurrency.colour'", "unknown key"),
    ]
    text = "\n".join(details)
    for line, where, message in expected:
        assert any(d.startswith(f"{path}:{line}: {where}") and message in d
                   for d in details), f"missing {line}: {where} / {message}\n{text}"
    assert len(details) == len(expected), text
