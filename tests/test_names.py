"""Issue 13, "Pick names that do not collide": the stage, the selector and the policies
each have one name; the previous release's names still work for one release, and each use
(an import, an attribute access, a call through either) emits exactly one
DeprecationWarning that names the replacement. New names emit none."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.utils.data
import torchdata.nodes as tn

import es_pipe

OLD = ("Sampler", "EvolvedSampler", "EvolvedSampling", "evolve", "InfoBatch")
NEW = ("Selector", "SelectStage", "Evolved", "Pruning")


def _samples(n: int = 24) -> list[dict]:
    return [
        {"x": torch.tensor([float(i)]), "__key__": f"k{i}", "__shard__": "s", "__index__": i}
        for i in range(n)
    ]


def _deprecations(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]


def _run(stage_loader: tn.Loader) -> list[list[str]]:
    """Two epochs of picks (keys) with fixed losses."""
    picks = []
    for _ in range(2):
        for meta in stage_loader:
            picks.append(list(meta.select(meta.data["x"][:, 0] + 1.0).keys))
    return picks


def test_the_public_api_has_one_name_per_concept_and_no_old_name():
    assert set(NEW) <= set(es_pipe.__all__)
    assert not set(OLD) & set(es_pipe.__all__)
    assert not set(OLD) & set(dir(es_pipe))  # not even as plain attributes
    namespace: dict = {}
    exec("from es_pipe import *", namespace)
    assert not set(OLD) & set(namespace)
    # the selector is not torch's Sampler, and nothing public is called Sampler
    assert not issubclass(es_pipe.Selector, torch.utils.data.Sampler)
    assert [n for n in es_pipe.__all__ if n.endswith("Sampler") or n == "evolve"] == []


def test_the_new_names_warn_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from es_pipe import Evolved, Pruning, Selector, SelectStage  # noqa: F401

        selector = es_pipe.Selector(es_pipe.Evolved(), 8, 4, seed=0)
        es_pipe.Selector.recommended(8, total_epochs=2)
        es_pipe.Pruning.infobatch(0.5)
        _run(tn.Loader(es_pipe.SelectStage(_samples(), selector)))


@pytest.mark.parametrize(
    ("module", "name", "replacement"),
    [
        ("es_pipe", "Sampler", "es_pipe.Selector"),
        ("es_pipe", "EvolvedSampler", "es_pipe.Selector(es_pipe.Evolved(beta1, beta2)"),
        ("es_pipe", "EvolvedSampling", "es_pipe.SelectStage"),
        ("es_pipe", "evolve", "torchdata.nodes.Loader(es_pipe.SelectStage("),
        ("es_pipe", "InfoBatch", "es_pipe.Pruning.infobatch"),
        ("es_pipe.sampler", "Sampler", "es_pipe.Selector"),
        ("es_pipe.sampler", "EvolvedSampler", "es_pipe.Selector("),
        ("es_pipe.stage", "EvolvedSampling", "es_pipe.SelectStage"),
        ("es_pipe.stage", "evolve", "es_pipe.SelectStage"),
        ("es_pipe.eswp", "InfoBatch", "es_pipe.Pruning.infobatch"),
        ("es_pipe.eswp.rule", "InfoBatch", "es_pipe.Pruning.infobatch"),
        ("es_pipe.pruning", "InfoBatch", "es_pipe.Pruning.infobatch"),
    ],
)
def test_each_old_name_warns_once_per_use_and_names_its_replacement(module, name, replacement):
    mod = importlib.import_module(module)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exec(f"from {module} import {name}", {})  # an import of the name
    messages = _deprecations(record)
    assert len(messages) == 1, messages  # not twice (importlib asks a package first)
    assert f"{module}.{name} is deprecated" in messages[0] and replacement in messages[0]
    assert record[0].filename == "<string>"  # attributed to the importing line
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        getattr(mod, name)  # an attribute access, as in es_pipe.Sampler(...)
    assert len(_deprecations(record)) == 1
    with pytest.warns(DeprecationWarning, match=rf"{name} is deprecated.*next release"):
        getattr(mod, name)


def test_a_call_through_an_old_name_warns_once():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old = es_pipe.EvolvedSampler(8, 4, beta1=0.1, beta2=0.7, seed=3)
    assert len(_deprecations(record)) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        es_pipe.Sampler(es_pipe.Uniform(), 4, 4)
        es_pipe.InfoBatch()
    assert len(_deprecations(record)) == 2
    assert isinstance(old, es_pipe.Selector) and old.policy == es_pipe.Evolved(0.1, 0.7)


def test_the_old_names_behave_as_the_new_ones():
    with pytest.warns(DeprecationWarning):
        assert es_pipe.Sampler is es_pipe.Selector
    with pytest.warns(DeprecationWarning):
        assert es_pipe.EvolvedSampling is es_pipe.SelectStage
    with pytest.warns(DeprecationWarning):
        assert es_pipe.InfoBatch(0.3, 0.5) == es_pipe.Pruning.infobatch(0.3, 0.5)
    # ES with given betas: the same picks through the old and the new names
    new = es_pipe.Selector(es_pipe.Evolved(0.1, 0.7), 8, 3, seed=4)
    with pytest.warns(DeprecationWarning):
        old = es_pipe.EvolvedSampler(8, 3, beta1=0.1, beta2=0.7, seed=4)
    with pytest.warns(DeprecationWarning):
        old_loader = es_pipe.evolve(_samples(), old)
    picks = _run(old_loader)
    assert picks == _run(tn.Loader(es_pipe.SelectStage(_samples(), new)))
    assert len(picks) == 6 and all(len(p) == 3 for p in picks)
    # the recommended configuration under either name: same hyper-parameters, no
    # further warning from the call itself
    with pytest.warns(DeprecationWarning) as record:
        old_rec = es_pipe.EvolvedSampler.recommended(16, total_epochs=4, seed=1)
    assert len(_deprecations(list(record))) == 1
    assert old_rec.hyper() == es_pipe.Selector.recommended(16, total_epochs=4, seed=1).hyper()
    old_scores, new_scores = old.state_dict()["scores"], new.state_dict()["scores"]
    assert old_scores.keys() == new_scores.keys()
    for key, value in old_scores.items():
        other = new_scores[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_an_unknown_name_is_still_an_attribute_error():
    for module in ("es_pipe", "es_pipe.sampler", "es_pipe.stage", "es_pipe.eswp"):
        mod = importlib.import_module(module)
        with pytest.raises(AttributeError, match="Samplr"):
            mod.Samplr  # noqa: B018
    with pytest.raises(ImportError):
        from es_pipe import Samplr  # noqa: F401


def test_importing_es_pipe_warns_about_nothing():
    """Importing the package (and its modules) uses no deprecated name internally."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import es_pipe, es_pipe.sampler, es_pipe.stage, es_pipe.eswp, es_pipe.renamed\n"
        "import es_pipe.demo.harness, es_pipe.tools.cli\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deprecation_warnings_are_visible_but_not_errors_in_this_suite(pytestconfig):
    filters = pytestconfig.getini("filterwarnings")
    assert "always::DeprecationWarning" in filters
    assert not any(f.startswith("error") and "Deprecation" in f for f in filters)
