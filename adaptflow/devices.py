"""Which torch device a step runs on: the one rule every stage, the head and the tools share."""

from __future__ import annotations


def resolve_device(choice: str = "auto") -> str:
    """``"cuda"`` when ``choice`` is ``"auto"`` and a CUDA device is visible, else ``"cpu"``; an explicit choice
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``) is returned as given."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
