"""The docs blocks the benchmarks regenerate (in docs/*.md): ``<!-- benchmark:NAME:start -->`` ... ``<!-- benchmark:NAME:end -->``."""

from __future__ import annotations

from pathlib import Path


def markers(block: str) -> tuple[str, str]:
    return f"<!-- benchmark:{block}:start -->", f"<!-- benchmark:{block}:end -->"


def update_block(page: Path, block: str, section: str) -> None:
    """Replace what lies between the block's markers in the docs `page` by `section`."""
    start, end = markers(block)
    text = Path(page).read_text()
    if start not in text or end not in text:
        raise ValueError(f"{page} has no {start} ... {end} block to replace.")
    head, rest = text.split(start, 1)
    Path(page).write_text(head + start + "\n" + section + "\n" + end + rest.split(end, 1)[1])
