"""``python -m aura360_events [FILE|-]``: publishes each JSON line (one event per line) with the environment's
settings and prints one JSON summary: ``{"published": n, "by_backend": {...}, "errors": [...]}``. Exit status 1 when an
event was not published."""

from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional

from .publisher import Publisher, PublishError, UnroutableEvent


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "-"
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    publisher = Publisher()
    by_backend: Dict[str, int] = {}
    errors: List[str] = []
    published = 0
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                backend = publisher.publish(json.loads(line))
            except (ValueError, UnroutableEvent, PublishError) as error:
                errors.append(f"line {number}: {error}")
                continue
            published += 1
            by_backend[backend] = by_backend.get(backend, 0) + 1
    publisher.flush()
    print(json.dumps({"published": published, "by_backend": by_backend, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
