"""A command for tests/test_cli.py: hangs when forked from the test zygote (which has imported
effbench's commands), finishes at once as a fresh interpreter."""

from __future__ import annotations

import sys
import time


def main() -> None:
    if "effbench.cli" in sys.modules:  # a fork of the zygote
        time.sleep(600)
    print("fresh interpreter")


if __name__ == "__main__":
    main()
