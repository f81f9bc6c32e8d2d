"""Corpora: local text files, or `datasets` names where the Hub is reachable.

Every corpus is split once into a calibration part and a held-out evaluation part (its last
`HOLDOUT_FRACTION`), so that evaluation never scores text a compressor was fitted on.
"""

from __future__ import annotations

from pathlib import Path

import kvcompress
from kvcompress.extras import require

HOLDOUT_FRACTION = 0.2
# WikiText-2 validation (CC BY-SA 3.0), shipped inside the package: see its SOURCE.md for attribution.
DEFAULT_CORPUS = Path(kvcompress.__file__).resolve().parent / "data" / "wikitext-2" / "valid.txt"
DEFAULT_CORPUS_NAME = "WikiText-2 validation (shipped with kvcompress, CC BY-SA 3.0)"


def load_text(source: str | Path | None = None) -> str:
    """The text of a corpus.

    `source` is a local text file, or ``"dataset[:config][@split]"`` for `datasets.load_dataset`: a Hub
    name (e.g. ``"wikitext:wikitext-2-raw-v1@validation"``) or a local dataset directory
    (e.g. ``"corpus_dir@train"``). None is the shipped WikiText-2 validation text.
    """
    source = DEFAULT_CORPUS if source is None else source
    path = Path(source)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif Path(str(source).partition("@")[0]).is_dir():
        text = _load_dataset_text(str(source))
    elif path.suffix in (".txt", ".md", ".text") or path.is_absolute() or str(source).startswith("."):
        raise FileNotFoundError(
            f"Corpus file {source} does not exist. Pass an existing text file, or a datasets name such as "
            "'wikitext:wikitext-2-raw-v1@validation'."
        )
    else:
        from huggingface_hub import constants

        from .hub import hub_unreachable, missing_locally

        reason = None if constants.HF_HUB_OFFLINE else hub_unreachable()  # offline on purpose: datasets reads its cache
        if reason is not None:  # a mistyped file name would otherwise wait out the Hub's retries, then blame the connection
            raise missing_locally(str(source), "text file or dataset directory", f"{reason} (a cached Hub dataset loads with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1)")
        text = _load_dataset_text(str(source))
    if not text.strip():
        raise ValueError(f"Corpus {source} is empty.")
    return text


def _load_dataset_text(spec: str) -> str:
    require("datasets", "calibration", "Loading a Hub dataset as a corpus")
    from datasets import load_dataset

    name, _, split = spec.partition("@")
    config = ""
    if not Path(name).is_dir():  # a Hub name may carry ":config"; a local directory is taken whole
        name, _, config = name.partition(":")
    dataset = load_dataset(name, config or None, split=split or "validation")
    column = "text" if "text" in dataset.column_names else dataset.column_names[0]
    return "\n".join(dataset[column])


def split_text(text: str, holdout_fraction: float = HOLDOUT_FRACTION) -> tuple[str, str]:
    """(calibration part, held-out evaluation part), split at a line boundary."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - holdout_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - holdout_fraction))
    return text[:cut], text[cut:]


def heldout_text(source: str | Path | None = None) -> str:
    """The evaluation part of a corpus."""
    return split_text(load_text(source))[1]
