"""tasks.yaml loading: a good file, and every mistake reported at once with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from aqsh.durations import parse_duration
from aqsh.errors import ConfigError
from aqsh.runner.inputs import InputType
from aqsh.runner.spec import load_tasks


def script(tmp_path: Path, name: str = "deploy.sh", executable: bool = True) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    return path


GOOD = """\
defaults: {timeout: 5m, max_retry: 3, retry_delay: 30s, queue: default, log_retention: 24h}
tasks:
  deploy:
    script: deploy.sh
    description: "Deploy application to environment"
    timeout: 10m
    max_retry: 2
    queue: long-running
    allowed_groups: [deploy-team, platform-team]
    input:
      - {name: version, env: VERSION, required: true, type: string,
         pattern: '^v?\\d+\\.\\d+\\.\\d+$', description: "Semantic version"}
      - {name: environment, env: ENVIRONMENT, required: true, type: string,
         enum: [dev, staging, prod]}
      - {name: dry_run, env: DRY_RUN, required: false, type: bool, default: "false"}
      - {name: older_than_days, env: OLDER_THAN_DAYS, type: int, min: 1, max: 365}
  cleanup:
    script: deploy.sh
"""


def test_loads_the_seed_example(tmp_path: Path) -> None:
    script(tmp_path)
    config = load_tasks(write(tmp_path, GOOD), tmp_path)
    deploy = config.tasks["deploy"]
    assert deploy.script == str((tmp_path / "deploy.sh").resolve())
    assert (deploy.timeout_s, deploy.max_retry, deploy.retry_delay_s, deploy.queue) == (
        600, 2, 30, "long-running")
    assert deploy.allowed_groups == ("deploy-team", "platform-team")
    assert [i.name for i in deploy.inputs] == ["version", "environment", "dry_run",
                                               "older_than_days"]
    assert deploy.inputs[2].type is InputType.BOOL
    assert deploy.inputs[2].default == "false"
    cleanup = config.tasks["cleanup"]
    assert (cleanup.timeout_s, cleanup.max_retry, cleanup.log_retention_s) == (300, 3, 86400)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("10m", 600), ("1h30m", 5400), ("24h", 86400), ("250ms", 0.25), (45, 45),
    ("0", 0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "1x", "m", "-5s", "1h 2m", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_every_mistake_is_reported_with_file_line_task_and_field(tmp_path: Path) -> None:
    script(tmp_path)
    script(tmp_path, "noexec.sh", executable=False)
    path = write(tmp_path, """\
tasks:
  a:
    script: deploy.sh
    colour: blue
    input:
      - {name: x, env: X}
      - {name: y, env: X}
      - {name: z, env: lower}
      - {name: p, env: PATH}
      - {name: q, env: AQSH_SECRET}
      - {name: r, env: R, pattern: '(unclosed'}
      - {name: s, env: S, type: int, default: 500, max: 10}
      - {name: t, env: T, type: int, min: 5, max: 1}
      - {name: u, env: U, type: int, enum: [a, b]}
      - {name: v, env: LD_PRELOAD}
  b:
    script: missing.sh
    timeout: soon
  c:
    script: noexec.sh
""")
    with pytest.raises(ConfigError) as caught:
        load_tasks(path, tmp_path)
    details = caught.value.details
    text = "\n".join(details)
    expected = [
        (4, "task 'a': field 'colour'", "unknown key"),
        (7, "task 'a': field 'input[1].env'", "duplicate env name X"),
        (8, "task 'a': field 'input[2].env'", "[A-Z_][A-Z0-9_]*"),
        (9, "task 'a': field 'input[3].env'", "PATH is reserved"),
        (10, "task 'a': field 'input[4].env'", "AQSH_SECRET is reserved"),
        (11, "task 'a': field 'input[5].pattern'", "does not compile"),
        (12, "task 'a': field 'input[6].default'", "fails its own rules"),
        (13, "task 'a': field 'input[7].min'", "greater than max"),
        (14, "task 'a': field 'input[8].enum'", "string inputs only"),
        (15, "task 'a': field 'input[9].env'", "LD_PRELOAD is reserved"),
        (17, "task 'b': field 'script'", "does not exist"),
        (18, "task 'b': field 'timeout'", "duration"),
        (20, "task 'c': field 'script'", "is not executable"),
    ]
    for line, where, message in expected:
        assert any(
            d.startswith(f"{path}:{line}: {where}") and message in d for d in details
        ), f"missing error at line {line}: {where} / {message}\n{text}"
    assert len(details) == len(expected)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  a: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_tasks(path, tmp_path)


def test_unknown_top_level_and_empty_tasks(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks: {}\nextra: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_tasks(path, tmp_path)
    assert any("unknown key 'extra'" in d for d in caught.value.details)
    assert any("at least one task" in d for d in caught.value.details)


def test_schedules_are_validated_like_submissions(tmp_path: Path) -> None:
    script(tmp_path)
    text = """\
tasks:
  deploy:
    script: deploy.sh
    input:
      - {name: env, env: TARGET, required: true, enum: [staging, prod]}
      - {name: n, env: N, type: int, default: 2}
    schedules:
      - cron: "0 3 * * *"
        input: {env: prod}
      - cron: "CRON_TZ=Europe/Berlin @daily"
        input: {env: staging, n: 5}
"""
    spec = load_tasks(write(tmp_path, text), tmp_path).tasks["deploy"]
    assert [(s.cron, s.input) for s in spec.schedules] == [
        ("0 3 * * *", {"env": "prod", "n": 2}),  # defaults applied, as on submit
        ("CRON_TZ=Europe/Berlin @daily", {"env": "staging", "n": 5}),
    ]
    bad = write(tmp_path, text + """\
      - cron: "0 61 * * *"
        input: {env: prod}
      - cron: "@daily"
        input: {env: moon, extra: 1}
      - cron: "@hourly"
        when: now
      - "@weekly"
""")
    with pytest.raises(ConfigError) as caught:
        load_tasks(bad, tmp_path)
    expected = [
        (12, "field 'schedules[2].cron'", "is not a cron spec"),
        (15, "field 'schedules[3].input.extra'", "is not an input of this task"),
        (15, "field 'schedules[3].input.env'", "must be one of staging, prod"),
        (17, "field 'schedules[4].when'", "unknown key"),
        (16, "field 'schedules[4].input.env'", "is required"),
        (18, "field 'schedules[5]'", "must be a mapping"),
    ]
    details = caught.value.details
    for line, where, message in expected:
        assert any(d.startswith(f"{bad}:{line}: task 'deploy': {where}") and message in d
                   for d in details), f"{line} {where}\n" + "\n".join(details)
    assert len(details) == len(expected)
