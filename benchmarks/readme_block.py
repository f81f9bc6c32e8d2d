"""The README blocks the benchmarks regenerate: ``<!-- benchmark:NAME:start -->`` ... ``<!-- benchmark:NAME:end -->``."""

from __future__ import annotations

from pathlib import Path


def markers(block: str) -> tuple[str, str]:
    return f"<!-- benchmark:{block}:start -->", f"<!-- benchmark:{block}:end -->"


def update_readme(readme: Path, block: str, section: str) -> None:
    """Replace what lies between the block's markers in `readme` by `section`."""
    start, end = markers(block)
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} block to replace.")
    head, rest = text.split(start, 1)
    Path(readme).write_text(head + start + "\n" + section + "\n" + end + rest.split(end, 1)[1])
