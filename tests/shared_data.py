"""Where the shared data sets live (../shared/data beside the checkout, as in CI); skip without them."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def needs_shared_data(filename: str) -> pytest.MarkDecorator:
    """Skip unless SHARED_DATA holds filename (CI has it; user machines may not)."""
    return pytest.mark.skipif(
        not (SHARED_DATA / filename).is_file(),
        reason=f"{filename} not found in {SHARED_DATA} (CI has it at ../shared/data; user machines may not)",
    )
