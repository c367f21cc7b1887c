"""The wrapper every `stages/<name>.py` runs under: params in, exit codes out."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from lmpipe.core.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, InputError
from lmpipe.core.last_good import report_restored, restore_file_outs
from lmpipe.core.names import DVC_STAGE_ENV
from lmpipe.core.params import Params, load_params
from lmpipe.core.paths import project_root


def relaunch_distributed(name: str, nproc: int) -> int | None:
    """Re-run stage `name` under torchrun with `nproc` processes, unless already under it.

    Returns the stage's exit code, or None when the stage should simply run in this process.

    torchrun (the `torch.distributed.run` command) exits 1 whatever its workers exited with,
    so a rank's InputError (exit 2: bad params or input, never retried by the flow) would
    come back as an ordinary failure and be retried. The launcher therefore runs in this
    process through torchrun's own entry point, whose ChildFailedError carries each rank's
    exit code; the first failure decides: 2 stays 2, anything else is 1.
    """
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return None
    # deferred: torch takes seconds to import and only a multi-process stage needs it here
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--standalone", f"--nproc_per_node={nproc}", "-m", f"stages.{name}"]
    print(f"stage {name}: launching {nproc} processes: torch.distributed.run {' '.join(argv)}",
          file=sys.stderr)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"stage {name}: rank {rank} exited with {failure.exitcode}", file=sys.stderr)
        return EXIT_BAD_INPUT if failure.exitcode == EXIT_BAD_INPUT else EXIT_FAILURE
    return EXIT_OK


def run_stage(name: str, main: Callable[[Params], None], argv: list[str] | None = None) -> int:
    """Load params.yaml, run `main(params)`, map failures to the project's exit codes.

    Bad input (InputError) exits 2 with `stage NAME: message`; anything else exits 1 with
    the traceback. Params are validated before any work starts. A stage that DVC started and
    that fails puts back its last good files (lmpipe/core/last_good.py): DVC deleted them
    before the command ran, and dvc.lock still describes them.
    """
    code = _run(name, main)
    if code != EXIT_OK and os.environ.get(DVC_STAGE_ENV) == name and "LOCAL_RANK" not in os.environ:
        line = report_restored(name, *restore_file_outs(name))
        if line:
            print(line, file=sys.stderr)
    return code


def _run(name: str, main: Callable[[Params], None]) -> int:
    params_file = os.environ.get("LMPIPE_PARAMS", str(project_root() / "params.yaml"))
    try:
        try:
            params = load_params(params_file)
        except InputError as err:
            print(f"stage {name}: error: {err}", file=sys.stderr)
            print(f"stage {name}: fix params.yaml (`git diff params.yaml` shows what changed)",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        train = getattr(getattr(params, name, None), "train", None)
        code = relaunch_distributed(name, getattr(train, "nproc_per_node", 1))
        if code is not None:
            return code
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
