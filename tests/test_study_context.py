"""The study context: each shared thing (real images, synthetic images, the probe) computed once."""

import collections

import pytest

from tests.helpers import tiny_configs
from xray_dit.study import context as context_lib
from xray_dit.study import probe


def test_context_computes_each_shared_thing_once(tmp_path, monkeypatch):
    calls = collections.Counter()

    def counted(name, value):
        def make(*args, **kwargs):
            calls[(name, args[2] if name == "real" else None, kwargs.get("only_class"))] += 1
            return value
        return make
    monkeypatch.setattr(probe, "real_images", counted("real", "images"))
    monkeypatch.setattr(probe, "synthetic_images", counted("synthetic", "generated"))
    monkeypatch.setattr(probe, "ClassifierProbe", counted("probe", "classifier"))
    config = tiny_configs.tiny_config(tmp_path)
    generators = [{"name": name, "out_dir": str(tmp_path / name)} for name in ("target_only_seed0", "target_only_seed1")]
    context = context_lib.StudyContext(config=config, workdir=tmp_path, mesh=None,
                                       results={"04_generate": {"generators": generators}})
    for _ in range(2):
        assert context.real_images("train") == "images"
        assert context.real_images("test", only_class="Cardiomegaly") == "images"
        assert context.synthetic_images() == "generated" and context.probe() == "classifier"
        assert context.synthetic_images("target_only_seed1") == "generated"
        assert context.synthetic_images("target_only_seed0") == "generated"   # the first generator's, cached
    assert calls == {("real", "train", None): 1, ("real", "test", "Cardiomegaly"): 1, ("synthetic", None, None): 2,
                     ("probe", None, None): 1}
    with pytest.raises(KeyError, match="no generator 'class_conditional_seed0'"):
        context.synthetic_images("class_conditional_seed0")
