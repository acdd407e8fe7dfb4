"""A command-line case's process, forked from a server that has imported the trainer (see test_cli.py)."""
import os
import sys


def cli_child(argv: list[str], cwd: str, out: str, err: str) -> None:
    """stdout and stderr to files, then the command line itself: its exit code is the process's."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(1)  # the tiny models gain nothing from a second thread on a shared machine
    from trainer_core import cli

    sys.argv = ["trainer_core", *argv]
    sys.exit(cli.main(argv))
