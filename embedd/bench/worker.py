"""One side of a benchmark in a fresh interpreter: ``python -m embedd.bench.worker NAME ARGS``.

Prints one JSON line with the side's figures (including its own peak RSS).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def _sides() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    from embedd.bench import collect, pipeline

    return {
        "collect.embedd": collect.embedd_side,
        "collect.baseline": collect.baseline_side,
        "collect.idle": collect.idle_side,
        "intake.floor": pipeline.tokenizer_floor,
    }


def main(argv: list[str]) -> int:
    name, raw = argv
    print(json.dumps(_sides()[name](json.loads(raw))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
