"""The ``aqsh`` command line (click; rich for tables and spinners).

Three kinds of command share one entry point:

* process commands, what a container runs: ``serve``, ``worker``, ``api``, ``check-config``;
* client commands over the HTTP API, for people and CI jobs: ``run``, ``get``, ``logs``,
  ``cancel``, ``runs``, ``tasks``;
* ``admin`` commands straight on Redis, the asynq CLI's job (queues, tasks in every state,
  servers, cron), working on tasks any asynq client enqueued.

click brings shell completion for free: ``eval "$(_AQSH_COMPLETE=bash_source aqsh)"`` (or
``zsh_source``).
"""

from __future__ import annotations

import click

from aqsh import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="""\b
Shell completion:
  eval "$(_AQSH_COMPLETE=bash_source aqsh)"    # in ~/.bashrc
  eval "$(_AQSH_COMPLETE=zsh_source aqsh)"     # in ~/.zshrc
""")
@click.version_option(__version__, prog_name="aqsh", message="%(prog)s %(version)s")
def cli() -> None:
    """aqsh: run pre-configured shell scripts behind an HTTP API, on asynq's Redis queue."""


def _register() -> None:
    from aqsh.cli import admin, client, process

    for command in (*process.COMMANDS, *client.COMMANDS):
        cli.add_command(command)
    cli.add_command(admin.admin)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (commands return theirs)."""
    try:
        result = cli.main(args=argv, prog_name="aqsh", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141  # `aqsh … | head`: the reader left; nothing to report
    if isinstance(result, int):
        return result
    return 0
