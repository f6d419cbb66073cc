"""The public names: everything in ``hotswap.__all__`` resolves, lazily where it costs torch."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import hotswap
from hotswap import settings, validate

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_its_defining_module() -> None:
    for name in hotswap.__all__:
        value = getattr(hotswap, name)
        module = hotswap._LAZY.get(name)
        if module is not None:
            assert value is getattr(sys.modules[module], name), name
    assert set(hotswap._LAZY) <= set(hotswap.__all__)
    assert set(hotswap.__all__) <= set(dir(hotswap))


def test_names_that_read_redis_import_no_torch() -> None:
    # What a status page or a health probe needs (a client, the store, the
    # report type) must not pull in torch, as the read-only CLI commands do not.
    probe = (
        "import sys; from hotswap import ApplyReport, HotswapSettings, Store, connect, "
        "operation_retry; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, cwd=ROOT, capture_output=True, text=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("module", [validate, settings])
def test_public_docstring_examples_run(module: ModuleType) -> None:
    failed, attempted = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert attempted > 0 and failed == 0
