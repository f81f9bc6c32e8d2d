"""The docs blocks the benchmarks regenerate (in docs/*.md): ``<!-- benchmark:NAME:start -->`` ... ``<!-- benchmark:NAME:end -->``.

Each script takes ``--update-docs [PAGE]``: given alone it rewrites its block in its own docs page
(``docs/benchmarks.md`` for quality, GPU throughput and decode speed, ``docs/pretrained.md`` for the
pretrained compressors); given a page, in that page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def markers(block: str) -> tuple[str, str]:
    return f"<!-- benchmark:{block}:start -->", f"<!-- benchmark:{block}:end -->"


def add_update_docs(parser: argparse.ArgumentParser, page: str, block: str) -> None:
    """``--update-docs [PAGE]``: rewrite the `block` in PAGE, by default `page` in the repository's docs/."""
    parser.add_argument(
        "--update-docs", nargs="?", const=str(DOCS / page), default=None, metavar="PAGE",
        help=f"also write the generated '{block}' block into this docs page (given alone: docs/{page})",
    )


def update_block(page: Path, block: str, section: str) -> None:
    """Replace what lies between the block's markers in the docs `page` by `section`."""
    start, end = markers(block)
    text = Path(page).read_text()
    if start not in text or end not in text:
        raise ValueError(f"{page} has no {start} ... {end} block to replace.")
    head, rest = text.split(start, 1)
    Path(page).write_text(head + start + "\n" + section + "\n" + end + rest.split(end, 1)[1])
