"""Files that several processes may write at once."""
from __future__ import annotations

import os
import threading
from pathlib import Path


def replace_atomically(path: Path, write) -> None:
    """write(partial), then rename the partial onto `path`: readers see the old file or the new one, never a
    torn one. The partial's name carries the process and thread, so writers of the same path (HPO workers
    summarising one study into one directory, trials filling one teacher cache) never rename each other's
    partial away; it keeps `path`'s suffix, which np.save and savefig go by."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
