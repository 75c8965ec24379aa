"""Split-digits task-incremental continual learning (pairs of classes, multi-head MLP).

A thin entry point for ``continual_permuted_digits.py --variant split``; all options are forwarded:

    python experiments/continual_split_digits.py [--quick] [--seeds 5] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from continual_permuted_digits import main  # noqa: E402

if __name__ == "__main__":
    main(["--variant", "split", *sys.argv[1:]])
