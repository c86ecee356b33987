"""What every end-to-end test asserts of a private result: within the error its run stated."""

from __future__ import annotations

from typing import Any

import numpy as np


def assert_within_stated_error(logits: Any, reference: np.ndarray, encoding: dict | None) -> float:
    """The private logits are within the stated error of the plaintext ones (the session's
    encoding, as the server told the client: PartyReport.encoding or a run's summary); returns
    the error measured."""
    assert encoding is not None and encoding["stated_error"] > 0, encoding
    error = float(np.abs(np.asarray(logits, dtype=np.float64) - np.asarray(reference, dtype=np.float64)).max())
    assert error <= encoding["stated_error"], (error, encoding["stated_error"], encoding.get("stated_error_source"))
    return error
