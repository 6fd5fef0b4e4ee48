"""The score kinds, one list shared with the kernels (``ScoreKind`` in csrc/common/scores.h: same values)."""

from __future__ import annotations

from enum import IntEnum


class ScoreKind(IntEnum):
    """fl4health's six score formulas in the order of its functions, and GIVEN for custom scores."""

    LARGEST_FINAL_MAGNITUDE = 0  # |x|
    SMALLEST_FINAL_MAGNITUDE = 1  # -|x|
    LARGEST_MAGNITUDE_CHANGE = 2  # |x - y|
    SMALLEST_MAGNITUDE_CHANGE = 3  # -|x - y|
    LARGEST_INCREASE_IN_MAGNITUDE = 4  # |x| - |y|
    SMALLEST_INCREASE_IN_MAGNITUDE = 5  # -(|x| - |y|)
    GIVEN = 6  # sparse selection only: the scores are the `initial` tensors (custom score functions)


NUM_FORMULAS = int(ScoreKind.GIVEN)  # the kinds below GIVEN are formulas of (model, initial); C++: kNumFormulaKinds


def uses_initial(kind: int) -> bool:
    """Whether the score needs the initial tensors (GIVEN: they hold the scores)."""
    return kind >= ScoreKind.LARGEST_MAGNITUDE_CHANGE
