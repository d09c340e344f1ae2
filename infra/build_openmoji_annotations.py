"""Regenerate the openmoji demo's annotation table (`pipeline/data/demo/openmoji-annotations.tsv.gz`).

    npm pack openmoji@17.0.0
    python infra/build_openmoji_annotations.py openmoji-17.0.0.tgz

The table is derived from `data/openmoji.json`, which only the npm package ships (CC BY-SA 4.0); see
`pipeline.data.demo.openmoji.build_annotations` for what it keeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.data.demo.openmoji import ANNOTATIONS, build_annotations


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python infra/build_openmoji_annotations.py openmoji-VERSION.tgz "
              "(from `npm pack openmoji@VERSION`)", file=sys.stderr)
        return 2
    print(f"wrote {build_annotations(argv[0])} emoji to {ANNOTATIONS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
