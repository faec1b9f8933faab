"""`vl`: a thin command line over the Python client and the embedded-server bootstrap.

This module only builds the parser (each command module adds its own subcommands) and dispatches: a command
returns its exit code; bad input, and errors a person can act on, end it with one line (cli/context.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cli import cmd_control, cmd_init, cmd_inspect, cmd_run, cmd_serve, cmd_simulate, context
from vaultlayer.request import RunRequestError

COMMAND_MODULES = (cmd_run, cmd_inspect, cmd_control, cmd_init, cmd_simulate, cmd_serve)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vl", description="Durable spot GPU training on Temporal.")
    top.add_argument("-v", "--verbose", action="store_true", help="tracebacks behind error messages")
    sub = top.add_subparsers(dest="verb", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    for verb in sub.choices.values():  # --verbose after the verb too; SUPPRESS keeps the top-level value
        verb.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="tracebacks behind error messages")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    context.set_verbose(args.verbose)
    try:
        result = args.handler(args)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
    except RunRequestError as err:
        context.fail("\nvl: error: ".join(err.problems))
    except context.UsageError as err:
        context.fail(str(err))
    except Exception as err:
        message = context.expected_message(err)
        if message is None:
            raise
        context.fail(message, code=1)
    except KeyboardInterrupt:
        run_id = getattr(args, "run_id", None)
        print("\ndetached; the run goes on" + (f" (vl status {run_id})" if run_id else ""), file=sys.stderr)
        code = context.EXIT_DETACHED
    context.exit_now(code)


if __name__ == "__main__":
    main()
