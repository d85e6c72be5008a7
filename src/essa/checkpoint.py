"""Run checkpoints: one ``checkpoint.npz`` of plain numeric arrays plus JSON metadata (stored as bytes),
written atomically and read with ``allow_pickle=False``: a damaged file is one line, never unpickled."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from essa import EssaError
from essa.files import atomic_write_bytes, fault_point

CHECKPOINT = "checkpoint.npz"


def save_checkpoint(run_dir: Path, meta: dict, arrays: dict[str, np.ndarray]):
    """One .npz holding the arrays and the JSON metadata (as bytes); written atomically, no pickle."""
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    fault_point("checkpoint")
    atomic_write_bytes(Path(run_dir) / CHECKPOINT, buf.getvalue())


def load_checkpoint(run_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The checkpoint's (metadata, arrays); a damaged file is one line (never unpickled)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise EssaError(f"{run_dir} has no {CHECKPOINT}; pass the run directory of an `essa train` run")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        if not all(k in meta for k in ("loop", "strategy", "data")):
            raise KeyError("loop/strategy/data")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, AttributeError):
        raise EssaError(f"{path} is damaged (not a complete essa checkpoint) and cannot be resumed; start a new run "
                        f"into another output_dir (nothing was changed)") from None
    return meta, arrays
