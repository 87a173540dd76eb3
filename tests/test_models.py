"""The model registry's CLI (python -m dynsplit_sglang.models): the accuracy suite's Qwen model
is one of its models, prepared on request and never by `prepare all` (the tests' models)."""

import pytest

from dynsplit_sglang import models as M


def test_qwen_is_a_registered_model_with_its_own_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYNSPLIT_CACHE_DIR", str(tmp_path))
    assert M.main(["path", "qwen"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / M.QWEN_MODEL)
    assert not M.is_ready(M.QWEN_MODEL)  # an empty cache holds nothing


def test_prepare_all_means_the_test_models_only(monkeypatch, capsys):
    built = []
    monkeypatch.setattr(M, "ensure", lambda name, force=False: built.append(name) or name)
    assert M.main(["prepare", "all"]) == 0
    assert built == [M.DEFAULT_MODEL, M.TINY_MODEL]
    built.clear()
    assert M.main(["prepare", "qwen"]) == 0
    assert built == [M.QWEN_MODEL]


def test_an_unknown_model_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=M.QWEN_MODEL):
        M.ensure("gpt-17")
