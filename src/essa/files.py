"""Files and run directories: atomic writes, one lock per run, what a run directory holds.

Every file essa writes into a run directory appears complete or not at all (a temporary file in the
same folder, fsync'd, then ``os.replace``); folders (adapters, model caches) likewise. A run directory
carries a marker naming the command that made it (``essa-run.json``), so a command refuses a folder
that holds something else, and an exclusive lock so two processes never share one.

``fault_point(name)`` is a no-op unless the environment variable ``ESSA_FAULT`` names that point: then
the process SIGKILLs itself there (``ESSA_FAULT=checkpoint:3`` = the third time the point is reached).
The fault-injection test uses it to kill runs inside checkpoint and export writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from essa import EssaError

MARKER = "essa-run.json"
LOCK = ".lock"
_fault_counts: dict[str, int] = {}


def fault_point(name: str):
    """For the fault-injection tests: when ``ESSA_FAULT`` is ``name``, ``name:N`` or ``name:N:hang``, the N-th
    time this process passes here it is SIGKILLed (or hangs). With ``ESSA_FAULT_ONCE=PATH`` the fault fires
    in only one process of a run: the first to create PATH (a restarted worker passes on)."""
    spec = os.environ.get("ESSA_FAULT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, mode = rest.partition(":")
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] != int(nth or 1):
        return
    once = os.environ.get("ESSA_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if mode == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            fault_point("write")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


def write_jsonl_atomic(records, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: str | Path, records: list[dict]):
    """Append whole lines (a kill can cut only the last one; `read_jsonl_lenient` drops it)."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl_lenient(path: str | Path) -> tuple[list[dict], int]:
    """(records, number of damaged lines skipped): a line cut off by a kill, or garbage, is left out."""
    records, bad = [], 0
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def temp_dir_beside(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", suffix=".tmp", dir=out_dir.parent))


def install_dir(tmp: Path, out_dir: Path):
    """Move the complete folder ``tmp`` to ``out_dir``, replacing what was there. A kill leaves either the
    old folder, or the new one, or (between the two renames) the old one under a hidden name that
    `remove_stale_temps` clears, the new one still complete in its temporary place."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}-old-{os.getpid()}.tmp"
        os.replace(out_dir, old)
    fault_point("install_dir")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: Path):
    """Delete the temporary files and folders a killed essa process left in ``folder`` (and its adapters/)."""
    for parent in (folder, folder / "adapters"):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------ run directories

def run_kind(folder: Path) -> str | None:
    """The command that made a run directory ('train', 'grpo'), or None when it is not one."""
    marker = folder / MARKER
    if marker.exists() and (folder / "config.json").exists():
        try:
            return json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
    if (folder / "checkpoint.npz").exists() and (folder / "config.json").exists():
        return "train"  # made before the marker existed
    return None


def is_empty(folder: Path) -> bool:
    """No files, or only what a start killed before writing its config leaves (lock, marker, temporaries)."""
    if not folder.exists():
        return True
    names = {p.name for p in folder.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    return names <= {LOCK} or names <= {LOCK, MARKER}


def check_new_run_dir(folder: Path, kind: str, resumable: bool):
    """Refuse a folder a new run of `kind` must not write into (one line, nothing touched)."""
    if folder.exists() and not folder.is_dir():
        raise EssaError(f"output_dir {folder} is a file; choose a folder path")
    if is_empty(folder):
        return
    found = run_kind(folder)
    if found == kind and resumable:
        raise EssaError(f"{folder} already holds an essa {kind} run; continue it with `essa {kind} --resume {folder}` "
                        f"or choose another output_dir")
    if found is not None:
        raise EssaError(f"{folder} already holds an essa {found} run; choose another output_dir (nothing in it was changed)")
    raise EssaError(f"{folder} is not empty and holds no essa {kind} run; choose a new or empty output_dir "
                    f"(nothing in it was changed)")


def start_run_dir(folder: Path):
    """Create (or take the empty) run directory and lock it. Returns the lock."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return lock_run_dir(folder)
    except PermissionError:
        raise EssaError(f"cannot write to {folder} (permission denied); choose a writable output_dir") from None


def mark_run_dir(folder: Path, kind: str, config: dict):
    """Record that the folder holds a run of `kind` and the config it was started with (marker first: a kill
    between the two leaves a folder `is_empty` accepts)."""
    write_json(folder / MARKER, {"kind": kind})
    write_json(folder / "config.json", config)


def lock_run_dir(folder: Path):
    """An exclusive lock on FOLDER/.lock for this process (released when the returned file is closed or the
    process ends, however it ends); a second process on the same run directory fails with one line."""
    import fcntl

    f = open(folder / LOCK, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise EssaError(f"{folder} is in use by another essa process; wait for it to finish or choose another "
                        f"output_dir") from None
    return f


def abandon_run_dir(folder: Path, created: bool, lock):
    """Undo `start_run_dir` after a failed start (bad data, model, reward ...): the folder is left as it was."""
    for name in (MARKER, "config.json", "calibration.json", "metrics.jsonl", "samples.jsonl"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "tb", ignore_errors=True)
    remove_stale_temps(folder)
    lock.close()
    if created:
        (folder / LOCK).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass
