"""Shared by the masking tests: the runs of consecutive selected positions of a row."""

from __future__ import annotations

import numpy as np


def runs_of(selected_T: np.ndarray) -> list[int]:
    """Lengths of the runs of consecutive True positions of one row."""
    runs, length = [], 0
    for flag in np.asarray(selected_T).tolist() + [False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs
