"""The wrapper every `stages/<name>.py` runs under: params in, exit codes out."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from lmpipe.config import Params, load_params
from lmpipe.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, InputError
from lmpipe.paths import project_root


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)


def run_stage(name: str, main: Callable[[Params], None], argv: list[str] | None = None) -> int:
    """Load params.yaml, run `main(params)`, map failures to the project's exit codes.

    Bad input (InputError) exits 2 with `stage NAME: message`; anything else exits 1 with
    the traceback. Params are validated before any work starts.
    """
    params_file = os.environ.get("LMPIPE_PARAMS", str(project_root() / "params.yaml"))
    try:
        params = load_params(params_file)
        main(params)
    except InputError as err:
        print(f"stage {name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"stage {name}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"stage {name}: failed (see the traceback above)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def main_for(name: str, main: Callable[[Params], None]) -> None:
    """`if __name__ == "__main__": main_for("download", run)` in each stage module."""
    sys.exit(run_stage(name, main))
