"""Where a benchmark writes its raw results and summary (JSON), and saying where."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def save(name: str, data: Any, path: Path | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` (default ``bench/results/NAME-STAMP.json``), print
    where, and return the path.

    Example::

        save("serving", {"raw": raw, "summary": summary}, args.json)
    """
    path = path or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    print(f"\nresults: {path}")
    return path
