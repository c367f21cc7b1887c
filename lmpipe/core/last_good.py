"""Putting back the last good outputs of a stage that failed under `dvc repro`.

DVC deletes a stage's outs before it runs the command (STACK-NOTES). When the command then
fails, dvc.lock still describes the previous, good outputs and DVC's cache still holds their
bytes: the cached outs because DVC committed them, the `cache: false` files
(`metrics/<stage>.json`, the loss plots) because DVC's run cache commits them too whenever it
records a run. `dvc checkout` brings back only the cached ones, so before this a failed stage
lost its metrics file for good.

After a failure the stage runner (lmpipe/core/stage.py, when DVC started the stage) and the
Prefect flow (after `dvc repro` exits, which also covers a killed stage) call
`restore_file_outs`: every file out of the stage's dvc.lock entry is copied back from the
cache, atomically, replacing whatever the failed run left, so the workspace matches dvc.lock
again. Folders (models, token files) are DVC's to restore: `dvc checkout STAGE`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from lmpipe.core.dvc_cli import cache_file
from lmpipe.core.files import atomic_path, md5_file
from lmpipe.core.paths import project_root
from lmpipe.core.records import read_lock


def restore_file_outs(stage: str, root: Path | None = None) -> tuple[list[str], list[str]]:
    """Restore the file outs of `stage` as dvc.lock records them.

    Returns (the files restored, the folder outs missing from the workspace). Never raises:
    it runs on a path that is already failing, and must not hide the first error."""
    root = root or project_root()
    restored: list[str] = []
    missing_folders: list[str] = []
    try:
        entry = read_lock(root, required=False).get(stage) or {}
        for out in entry.get("outs") or []:
            path, md5 = out.get("path"), str(out.get("md5") or "")
            if not path or not md5:
                continue
            target = root / path
            if md5.endswith(".dir"):
                if not target.exists():
                    missing_folders.append(path)
                continue
            if target.is_file() and md5_file(target) == md5:
                continue
            source = cache_file(root, md5)
            if not source.is_file():
                continue
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            restored.append(path)
    except Exception as err:  # a failed restore is reported, never raised over the failure
        print(f"lmpipe: could not restore the last good outputs of {stage}: {err}", file=sys.stderr)
    return restored, missing_folders


def report_restored(stage: str, restored: list[str], missing_folders: list[str]) -> str:
    """One line for the person watching; '' when there was nothing to say."""
    parts = []
    if restored:
        parts.append(f"put back the last good {', '.join(restored)} (as dvc.lock records them)")
    if missing_folders:
        parts.append(f"`dvc checkout {stage}` brings back {', '.join(missing_folders)}")
    return f"stage {stage}: " + "; ".join(parts) if parts else ""
