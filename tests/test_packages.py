"""Each stage's package says what it holds and exports it, without importing torch up front."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("pkg", ["atlasmix.store", "atlasmix.ingest", "atlasmix.mixing", "atlasmix.training",
                                 "atlasmix.evaluation", "atlasmix.study"])
def test_stage_packages_document_and_export(pkg):
    mod = importlib.import_module(pkg)
    assert mod.__doc__ and "open issues" not in mod.__doc__ and len(mod.__doc__) > 60
    assert mod.__all__
    for name in mod.__all__:
        obj = getattr(mod, name)
        assert getattr(obj, "__name__", name) == name
    with pytest.raises(AttributeError):
        getattr(mod, "no_such_name")


def test_training_and_evaluation_packages_import_without_torch():
    code = ("import sys, atlasmix.training, atlasmix.evaluation; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from atlasmix.training import MixtureLoader; "
            "from atlasmix.training.loader import MixtureLoader as M; assert MixtureLoader is M")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
