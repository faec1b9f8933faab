"""Errors a person can fix are said on one line; `vl --verbose` adds the traceback behind them."""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import NoReturn

_verbose = False


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


def print_traceback() -> None:
    """With --verbose, the traceback of the error being handled (if any), before its one-line message."""
    if _verbose and sys.exc_info()[1] is not None:
        traceback.print_exc()


def connect_failure(address: str, err: RuntimeError) -> str:
    """`Client.connect`'s error, which wraps the transport's, as one line."""
    reason = re.search(r'message: "([^"]+)"', str(err))
    return (f"cannot reach the Temporal server at {address} ({reason.group(1) if reason else err}); start it, fix "
            f"TEMPORAL_ADDRESS, or unset TEMPORAL_ADDRESS to use the embedded server")


def expected_message(err: BaseException) -> str | None:
    """One line for a server's refusal a person can act on; None for anything else, which is a bug and keeps
    its traceback."""
    from temporalio.service import RPCError, RPCStatusCode

    from vaultlayer.codec import EncryptionKeyError

    if isinstance(err, EncryptionKeyError):  # a run sealed with a key this shell lacks: the message names it
        return str(err)
    if not isinstance(err, RPCError):
        return None
    if err.status == RPCStatusCode.NOT_FOUND:
        return f"not found: {err.message}; list runs with: vl ls"
    if err.status == RPCStatusCode.UNAVAILABLE:
        return f"the Temporal server is unavailable ({err.message}); check that it runs, then try again"
    return f"the Temporal server refused the call: {err.message} ({err.status.name})"


def exit_now(code: int) -> NoReturn:
    """Exit with the output flushed but without the interpreter's finalization, where the Temporal client's
    Rust threads abort it now and then ("Fatal Python error: PyGILState_Release", exit 134 after a
    command that worked: temporalio/sdk-python#300). Everything `vl` awaited has finished by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
