"""What the bench scripts share on the command line."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments as one line (``error: ...``, exit status 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")
