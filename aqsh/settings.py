"""AQSH_* environment variables → a frozen Settings.

A bad value stops startup with one line naming the variable and what it accepts, before any
connection is made.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

from aqsh.durations import parse_duration
from aqsh.errors import ConfigError

Mode = Literal["api", "worker", "both"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    mode: Mode = "both"
    bind: str = "0.0.0.0:8080"
    tasks_config: str = "/etc/aqsh/tasks.yaml"
    tasks_dir: str = "/tasks"
    results_dir: str = os.path.join(tempfile.gettempdir(), "aqsh")
    data_dir: str = "data"
    redis_addr: str = "127.0.0.1:6379"
    redis_sentinel_addrs: tuple[str, ...] = ()
    redis_sentinel_master: str = "mymaster"
    #: Seed nodes of a Redis Cluster; set, it replaces redis_addr (and excludes Sentinel).
    redis_cluster_addrs: tuple[str, ...] = ()
    redis_password: str | None = None
    #: A file holding the password (a mounted Secret): read at start into redis_password, so
    #: the password never has to be in the environment.
    redis_password_file: str | None = None
    #: What a worker does with a task whose type is not in tasks.yaml: ``retry`` it with asynq's
    #: back-off and "handler not found", as a Go server would (another server on the queue may
    #: have the handler), or ``archive`` it at once.
    unknown_tasks: Literal["retry", "archive"] = "retry"
    worker_concurrency: int = 10
    #: Empty: every queue named in tasks.yaml, weight 1.
    worker_queues: tuple[tuple[str, int], ...] = ()
    worker_strict_priority: bool = False
    identity_header: str = "X-Forwarded-User"
    require_identity: bool = False
    groups_header: str = "X-Forwarded-Groups"
    #: Peers (CIDRs) whose identity and groups headers are believed: the authenticating proxy.
    #: From any other peer those headers are ignored, so a caller reaching the port directly
    #: cannot claim to be someone. Default: loopback (a sidecar proxy in the same pod).
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: Callers in any of these groups see and cancel every task, including those submitted
    #: without an access record (by a Go service, or by an older aqsh).
    admin_groups: tuple[str, ...] = ()
    log_retention_s: float = 24 * 3600
    result_retention_s: float = 72 * 3600
    idempotency_ttl_s: float = 24 * 3600
    shutdown_timeout_s: float = 30.0
    kill_grace_s: float = 10.0
    max_body_bytes: int = 1024 * 1024
    #: A connection with no request (or with a request's headers still trickling in) for this
    #: long is closed; longer than common proxies' upstream keep-alive (60 s).
    http_idle_timeout_s: float = 75.0
    #: A request body must arrive within this (slow-client protection; 408 otherwise).
    http_body_timeout_s: float = 30.0
    max_input_length: int = 4096
    env_allowlist: tuple[str, ...] = ("PATH", "LANG", "HOME", "TZ")
    keep_work_dirs: bool = False
    log_format: Literal["pretty", "json"] = "pretty"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: auto: uvloop for mode api (cheaper enqueues), the standard loop where scripts are
    #: spawned (uvloop spawns subprocesses several times slower).
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    #: Run the schedules of tasks.yaml in worker / both modes. Every replica may run them: each
    #: fire is stored once (see aqsh.engine.scheduler).
    scheduler: bool = True
    #: How long a submission waits out an unreachable Redis (a restart, a Sentinel failover)
    #: before answering 503. Retries reuse the task id, so a submission is never stored twice.
    submit_retry_s: float = 5.0
    #: Webhooks (aqsh.webhooks). Deliveries run on a server of their own in worker mode, with
    #: its own concurrency, so a slow receiver never holds a slot a script could use.
    webhook_worker: bool = True
    webhook_concurrency: int = 20
    webhook_timeout_s: float = 15.0
    #: Delay before each attempt (the first is immediate): the Standard Webhooks schedule.
    webhook_schedule_s: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    #: A body over this drops result.data (and says so in ``result.data_omitted``).
    webhook_max_body_bytes: int = 64 * 1024
    #: How often a worker looks for ended tasks whose deliveries were never enqueued (the
    #: process that ended them died first).
    webhook_sweep_interval_s: float = 30.0
    #: Makes the links in webhook bodies absolute (e.g. https://aqsh.example.com).
    public_url: str | None = None
    #: Per-submission callbacks: the operator's signing secret(s), and where they may point.
    callback_secret: str | None = None
    callback_secret_file: str | None = None
    callback_allowed_hosts: tuple[str, ...] = ()
    callback_allow_http: bool = False
    #: Networks a callback may reach although they are loopback/private/link-local.
    callback_allowed_networks: tuple[str, ...] = ()
    #: Log followers (SSE streams) one process serves at once; more are answered 503.
    max_sse_clients: int = 1000

    @property
    def uses_uvloop(self) -> bool:
        return self.event_loop == "uvloop" or (self.event_loop == "auto" and self.mode == "api")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host or "0.0.0.0", int(port)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("a positive integer")
    return value


def _duration(text: str) -> float:
    return parse_duration(text)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _cidrs(text: str) -> tuple[str, ...]:
    """Normalised CIDRs; an empty value trusts no peer at all."""
    try:
        return tuple(str(ipaddress.ip_network(part, strict=False)) for part in _csv(text))
    except ValueError:
        raise ValueError("CIDRs, comma separated") from None


def _queues(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in _csv(text):
        # The weight follows the last colon; aqsh's reserved queues (aqsh:webhooks) have a
        # colon of their own, so for them a weight is optional.
        name, sep, weight = part.rpartition(":")
        if not sep or (part.startswith("aqsh:") and not weight.strip().isdigit()):
            name, weight = part, ""
        if not name.strip():
            raise ValueError("queue names, optionally name:weight, comma separated")
        out.append((name.strip(), _positive_int(weight) if weight else 1))
    return tuple(out)


def _addrs(text: str) -> tuple[str, ...]:
    addrs = _csv(text)
    for addr in addrs:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("host:port,host:port")
    if not addrs:
        raise ValueError("host:port,host:port")
    return addrs


def _schedule(text: str) -> tuple[float, ...]:
    delays = tuple(parse_duration(part) for part in _csv(text))
    if not delays:
        raise ValueError("durations, comma separated")
    return delays


def _whsec(text: str) -> str:
    from aqsh.webhooks.signing import InvalidSecret, parse_secrets

    try:
        parse_secrets(text)
    except InvalidSecret:
        raise ValueError("whsec_ secrets") from None
    return text


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("an http(s) URL")
    return text.rstrip("/")


def _bind(text: str) -> str:
    _, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("host:port, e.g. 0.0.0.0:8080")
    return text


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError("one of " + ", ".join(options))
        return text

    return parse


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("a non-empty value")
    return text


def _password_file(path: str) -> str:
    """The password from a mounted Secret: the file's text without its trailing line break
    (``echo pw > file`` and a Kubernetes Secret key read the same). Nothing of it is logged."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"AQSH_REDIS_PASSWORD_FILE={path!r} cannot be read: {reason}") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"AQSH_REDIS_PASSWORD_FILE={path!r} is empty")
    return password


#: variable suffix → (field, parser, what it accepts)
_FIELDS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "MODE": ("mode", _choice("api", "worker", "both"), "api, worker or both"),
    "BIND": ("bind", _bind, "host:port"),
    "TASKS_CONFIG": ("tasks_config", _text, "a file path"),
    "TASKS_DIR": ("tasks_dir", _text, "a directory path"),
    "RESULTS_DIR": ("results_dir", _text, "a directory path"),
    "DATA_DIR": ("data_dir", _text, "a directory path"),
    "REDIS_ADDR": ("redis_addr", _text,
                   "host:port, a redis:// or rediss:// URL, or 'embedded'"),
    "REDIS_SENTINEL_ADDRS": ("redis_sentinel_addrs", _csv, "host:port,host:port"),
    "REDIS_SENTINEL_MASTER": ("redis_sentinel_master", _text, "a master name"),
    "REDIS_CLUSTER_ADDRS": ("redis_cluster_addrs", _addrs,
                            "cluster seed nodes as host:port,host:port"),
    "REDIS_PASSWORD": ("redis_password", str, "a password"),
    "REDIS_PASSWORD_FILE": ("redis_password_file", _text, "a file path"),
    "UNKNOWN_TASKS": ("unknown_tasks", _choice("retry", "archive"), "retry or archive"),
    "WORKER_CONCURRENCY": ("worker_concurrency", _positive_int, "a positive integer"),
    "WORKER_QUEUES": ("worker_queues", _queues, "name[:weight],name[:weight]"),
    "WORKER_STRICT_PRIORITY": ("worker_strict_priority", _bool, "true or false"),
    "IDENTITY_HEADER": ("identity_header", _text, "a header name"),
    "REQUIRE_IDENTITY": ("require_identity", _bool, "true or false"),
    "GROUPS_HEADER": ("groups_header", _text, "a header name"),
    "TRUSTED_PROXIES": ("trusted_proxies", _cidrs,
                        "CIDRs, comma separated, e.g. 127.0.0.0/8,::1/128,10.0.0.0/8"),
    "ADMIN_GROUPS": ("admin_groups", _csv, "group names, comma separated"),
    "LOG_RETENTION": ("log_retention_s", _duration, "a duration like 24h"),
    "RESULT_RETENTION": ("result_retention_s", _duration, "a duration like 72h"),
    "IDEMPOTENCY_TTL": ("idempotency_ttl_s", _duration, "a duration like 24h"),
    "SHUTDOWN_TIMEOUT": ("shutdown_timeout_s", _duration, "a duration like 30s"),
    "KILL_GRACE": ("kill_grace_s", _duration, "a duration like 10s"),
    "MAX_BODY_BYTES": ("max_body_bytes", _positive_int, "a positive integer (bytes)"),
    "HTTP_IDLE_TIMEOUT": ("http_idle_timeout_s", _duration, "a duration like 75s"),
    "HTTP_BODY_TIMEOUT": ("http_body_timeout_s", _duration, "a duration like 30s"),
    "MAX_INPUT_LENGTH": ("max_input_length", _positive_int, "a positive integer"),
    "ENV_ALLOWLIST": ("env_allowlist", _csv, "variable names, comma separated"),
    "KEEP_WORK_DIRS": ("keep_work_dirs", _bool, "true or false"),
    "LOG_FORMAT": ("log_format", _choice("pretty", "json"), "pretty or json"),
    "LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error"),
                  "debug, info, warning or error"),
    "EVENT_LOOP": ("event_loop", _choice("auto", "asyncio", "uvloop"), "auto, asyncio or uvloop"),
    "SCHEDULER": ("scheduler", _bool, "true or false"),
    "SUBMIT_RETRY": ("submit_retry_s", _duration, "a duration like 5s (0 answers 503 at once)"),
    "WEBHOOK_WORKER": ("webhook_worker", _bool, "true or false"),
    "WEBHOOK_CONCURRENCY": ("webhook_concurrency", _positive_int, "a positive integer"),
    "WEBHOOK_TIMEOUT": ("webhook_timeout_s", _duration, "a duration like 15s"),
    "WEBHOOK_SCHEDULE": ("webhook_schedule_s", _schedule,
                         "delays before each attempt, e.g. 0s,5s,5m,30m,2h,5h,10h,10h"),
    "WEBHOOK_MAX_BODY_BYTES": ("webhook_max_body_bytes", _positive_int,
                               "a positive integer (bytes)"),
    "WEBHOOK_SWEEP_INTERVAL": ("webhook_sweep_interval_s", _duration, "a duration like 30s"),
    "PUBLIC_URL": ("public_url", _url, "an http(s) URL, e.g. https://aqsh.example.com"),
    "CALLBACK_SECRET": ("callback_secret", _whsec,
                        "whsec_<base64> secrets (at least 24 bytes), space separated"),
    "CALLBACK_SECRET_FILE": ("callback_secret_file", _text, "a file path"),
    "CALLBACK_ALLOWED_HOSTS": ("callback_allowed_hosts", _csv,
                               "host patterns, comma separated, e.g. hooks.example.com,*.ci.io"),
    "CALLBACK_ALLOW_HTTP": ("callback_allow_http", _bool, "true or false"),
    "CALLBACK_ALLOWED_NETWORKS": ("callback_allowed_networks", _cidrs,
                                  "CIDRs, comma separated, e.g. 10.1.0.0/16"),
    "MAX_SSE_CLIENTS": ("max_sse_clients", _positive_int, "a positive integer"),
}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read AQSH_* variables; raises ConfigError naming the first bad variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if "AQSH_LOG_FORMAT" not in env:
        values["log_format"] = "pretty" if sys.stderr.isatty() else "json"
    for suffix, (field, parse, accepts) in _FIELDS.items():
        name = f"AQSH_{suffix}"
        if name not in env:
            continue
        try:
            values[field] = parse(env[name])
        except ValueError:
            raise ConfigError(
                f"{name}={env[name]!r} is not valid: expected {accepts}"
            ) from None
    values.update(overrides)
    if values.get("redis_password_file") is not None:
        if values.get("redis_password") is not None:
            raise ConfigError("AQSH_REDIS_PASSWORD and AQSH_REDIS_PASSWORD_FILE are mutually "
                              "exclusive: set one of them")
        values["redis_password"] = _password_file(values["redis_password_file"])
    if values.get("redis_cluster_addrs") and values.get("redis_sentinel_addrs"):
        raise ConfigError("AQSH_REDIS_CLUSTER_ADDRS and AQSH_REDIS_SENTINEL_ADDRS are mutually "
                          "exclusive: set one of them")
    if values.get("callback_secret") and values.get("callback_secret_file"):
        raise ConfigError("AQSH_CALLBACK_SECRET and AQSH_CALLBACK_SECRET_FILE are mutually "
                          "exclusive: set one of them")
    if values.get("webhook_sweep_interval_s", 1.0) <= 0:
        raise ConfigError("AQSH_WEBHOOK_SWEEP_INTERVAL must be positive")
    return Settings(**values)
