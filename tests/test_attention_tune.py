"""The attention tile tuner: it times candidates, keeps the fastest correct one, and the cache round-trips
(run on CPU under the Triton interpreter with tiny problems; a GPU session runs the real sweep)."""
import json
import warnings

import pytest
import torch

from fastllm.kernels import attention_tune as tune
from fastllm.kernels.attention import AttnConfig


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(tmp_path))
    tune._table.cache_clear()
    yield tmp_path
    tune._table.cache_clear()


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_tune_picks_a_candidate_and_the_cache_serves_it(cache_dir, kernel):
    cands = [AttnConfig(16, 16, 4, 1), AttnConfig(32, 16, 4, 1)]
    winners = tune.tune("cpu", dims=(64,), precisions=("fp32",), kernels=(kernel,), candidates=cands,
                        shape=(1, 2, 40), reps=1, log=lambda *_: None)
    k = tune.key("interpreter", kernel, 64, True)
    assert set(winners) == {k} and winners[k] in cands
    path = tune.save(winners)
    assert path == cache_dir / "attention_tiles.json"
    assert json.loads(path.read_text())[k] == list(winners[k].__dict__.values())
    assert tune.lookup("interpreter", kernel, 64, True) == winners[k]
    assert tune.lookup("interpreter", kernel, 128, True) is None


def test_unreadable_cache_is_ignored_with_a_warning(cache_dir):
    (cache_dir / "attention_tiles.json").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the attention tile cache"):
        assert tune.lookup("sm90", "fwd", 64, False) is None


def test_shipped_table_is_valid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k, cfg in tune._read(tune.SHIPPED).items():
            arch, kernel, dim, prec = k.split("/")
            assert kernel in ("fwd", "dkdv", "dq") and prec in ("half", "fp32") and int(dim) in (64, 128, 256)
            assert isinstance(cfg, AttnConfig)


def test_pick_config_falls_back_to_the_table_without_a_gpu():
    from fastllm.kernels.attention import CONFIGS, pick_config

    assert pick_config("fwd", 80, 80, torch.bfloat16, torch.device("cpu")) == CONFIGS[(128, False)]["fwd"]
