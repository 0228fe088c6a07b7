#!/usr/bin/env python
"""Write docs/published.md from the package's data file of published results.

    python scripts/published_leaderboard.py            # rewrite docs/published.md
    python scripts/published_leaderboard.py --check    # exit 1 when the page and the data file disagree

The page is `peftsmooth.report.leaderboard.leaderboard_markdown()`; tests/report/test_published.py
holds the committed page equal to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peftsmooth.report.leaderboard import leaderboard_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "published.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is stale")
    args = parser.parse_args(argv)
    text = leaderboard_markdown()
    if args.check:
        same = PAGE.is_file() and PAGE.read_text() == text
        print(f"{PAGE}: {'up to date' if same else 'differs from the data file; run this script'}")
        return 0 if same else 1
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
