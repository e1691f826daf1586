"""Every registered method passes the conformance checks of :mod:`mtbench.conformance` (no edits per method).

Exclusions live next to the checks, each with its reason: ``EXCEPTIONS``, ``TRAINS_EVERYTHING`` and
``NOT_IDENTITY_AT_INIT`` in ``mtbench/conformance.py``.
"""

from __future__ import annotations

import pytest

from mtbench import conformance, registry


@pytest.mark.parametrize("check", [name for name, _ in conformance.CHECKS])
@pytest.mark.parametrize("method", registry.methods.names())
def test_method_conforms(method: str, check: str) -> None:
    fn = dict(conformance.CHECKS)[check]
    result = conformance.run_check(registry.methods.get(method), check, fn)
    if result.skipped:
        pytest.skip(result.message)
    assert result.ok, f"{method}/{check}: {result.message}"


def test_registry_has_methods() -> None:
    # Guards against a discovery regression silently turning the suite above into zero tests.
    assert {"lora", "full_ft"} <= set(registry.methods.names())
