"""``python -m capsnet.figures KIND ...``: the paper's figures from a trained checkpoint
(Fig. 3 reconstructions, Fig. 4 dimension perturbation, Fig. 5 MultiMNIST).

The figures need the training extras (matplotlib, the data sets), so they live in
:mod:`capsnet.training.figures`; this module is only the command's short name and imports
them when run, so that the core package keeps importing with torch alone.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from capsnet.training.figures import main as figures_main

    return figures_main(argv)


if __name__ == "__main__":
    sys.exit(main())
