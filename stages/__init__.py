"""The DVC stages, one module per stage (`python -m stages.<name>`).

DVC runs a stage's command with whatever `python` comes first on PATH: with the project's
environment not activated (`.venv/bin/dvc repro`), that is another interpreter, which lacks
the project and its dependencies and used to fail deep inside a stage after DVC had deleted
its outputs. Every stage imports this package first, so the interpreter is checked here,
with the standard library only, and named in one line (exit 2, bad input). The `params`
stage runs before every other stage, so the check usually stops `dvc repro` before DVC
deletes anything.
"""

import importlib.metadata
import sys

try:
    importlib.metadata.version("lmpipe")
except importlib.metadata.PackageNotFoundError:
    sys.stderr.write(
        f"lmpipe: {sys.executable} does not have the project installed; activate the "
        "project's environment first (`source .venv/bin/activate`, created by `make run`), "
        "then run the dvc command again\n")
    sys.exit(2)
