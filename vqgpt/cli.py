"""What train.py, sample.py and `python -m vqgpt.eval` share on the command line: help that shows every
default, the --device choice, and user errors as one line (exit 2) with --debug for the traceback.

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_debug_flag(p)
    args = p.parse_args()
    run_or_exit(lambda: main(args), debug=args.debug, oom_hint="lower --batch-size")
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
# Errors that are the user's input or run (a bad path, a bad value, a model that does not fit): one line.
USER_ERRORS = (ValueError, FileNotFoundError, OSError, RuntimeError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written (example commands), and "(default: X)" after every flag's help,
    unless the help already says what its default is (e.g. "default: the checkpoint's" for a None)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also VQGPT_DEBUG=1) instead of one line")


def pick_device(name: str) -> str:
    """--device auto | cpu | cuda | mps -> the device to use; one that torch does not see is a ValueError."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for but torch sees no MPS device (Apple silicon, a macOS build "
                         "of torch)")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or the MPS backend's (a plain RuntimeError that says so)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def run_or_exit(fn, *, debug: bool = False, oom_hint: str, errors: tuple = USER_ERRORS):
    """fn(), with a user error printed as one line on stderr and exit code 2 (the traceback with --debug or
    VQGPT_DEBUG=1). Out of memory says which flag to lower (oom_hint), not torch's allocator report."""
    try:
        return fn()
    except errors as e:
        if debug or os.environ.get("VQGPT_DEBUG"):
            raise
        if is_out_of_memory(e):
            print(f"error: out of memory ({str(e).strip().splitlines()[0][:120]}): {oom_hint}", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
