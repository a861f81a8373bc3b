"""Device choice: ``auto`` falls back to the CPU with a warning when CUDA fails to
initialise, ``cuda`` fails fast with a clear error. CUDA's failure is forced by
monkeypatching ``torch.cuda`` (and the first allocation, which is where a busy device
fails inside a container), so these run on any machine."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _models import make_gemma3_text

from mergebake import MergebakeError, cli, device
from mergebake.config import RECIPES_DIR
from mergebake.device import cuda_problem, resolve_device
from mergebake.merge import merge_cell

BUSY = (
    "CUDA error: CUDA-capable device(s) is/are busy or unavailable\n"
    "CUDA kernel errors might be asynchronously reported at some other API call"
)


@pytest.fixture(autouse=True)
def fresh_probe():
    """The probe's answer is cached per process; each test starts without one."""
    cuda_problem.cache_clear()
    yield
    cuda_problem.cache_clear()


def _cuda(monkeypatch, *, available=True, count=1, busy=False):
    """Pretend torch sees ``count`` CUDA devices; ``busy``: the first allocation fails."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
    real_ones = torch.ones

    def ones(*args, device=None, **kwargs):
        if device is not None and str(device).startswith("cuda"):
            if busy:
                raise RuntimeError(BUSY)
            device = "cpu"  # a usable GPU: the probe's matmul runs (here on the CPU)
        return real_ones(*args, device=device, **kwargs)

    monkeypatch.setattr(torch, "ones", ones)


def test_cpu_never_probes_cuda(monkeypatch):
    def boom():
        raise AssertionError("cpu must not touch torch.cuda")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"


def test_auto_without_cuda_is_the_cpu_without_a_warning(monkeypatch, recwarn):
    _cuda(monkeypatch, available=False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_auto_uses_a_usable_gpu(monkeypatch, recwarn):
    _cuda(monkeypatch)
    assert resolve_device("auto") == "cuda"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_auto_falls_back_to_cpu_with_a_warning_when_cuda_fails_to_initialise(monkeypatch, caplog):
    _cuda(monkeypatch, busy=True)
    with caplog.at_level(logging.WARNING, logger="mergebake.device"):
        with pytest.warns(RuntimeWarning, match="busy or unavailable.*falling back to CPU"):
            assert resolve_device("auto") == "cpu"
    assert "falling back to CPU" in caplog.text


def test_cuda_fails_fast_with_a_clear_error(monkeypatch):
    _cuda(monkeypatch, busy=True)
    with pytest.raises(MergebakeError) as e:
        resolve_device("cuda")
    msg = str(e.value)
    assert "'cuda' requested but CUDA is not usable" in msg
    assert "busy or unavailable" in msg  # the cause, first line only
    assert "asynchronously" not in msg
    assert "use device: auto or cpu" in msg  # what to do


def test_cuda_without_cuda_and_a_missing_index_are_errors(monkeypatch):
    _cuda(monkeypatch, available=False)
    with pytest.raises(MergebakeError, match=r"is_available\(\) is False"):
        resolve_device("cuda")
    cuda_problem.cache_clear()
    _cuda(monkeypatch, count=1)
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(MergebakeError, match="no CUDA device 1 \\(found 1\\)"):
        resolve_device("cuda:1")


def test_unknown_device_is_an_error():
    with pytest.raises(MergebakeError, match="expected one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_the_probe_runs_once_per_process(monkeypatch):
    calls = []
    _cuda(monkeypatch, busy=True)
    real = torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or real())
    with pytest.warns(RuntimeWarning):
        resolve_device("auto")
    with pytest.warns(RuntimeWarning):
        resolve_device("auto")
    assert len(calls) == 1


def test_eval_cli_with_device_cuda_fails_before_loading_anything(monkeypatch, tmp_path, capsys):
    _cuda(monkeypatch, busy=True)
    import mergebake.evaluate

    def never(*a, **k):
        raise AssertionError("evaluate must not run when the device is unusable")

    monkeypatch.setattr(mergebake.evaluate, "evaluate", never)
    args = [
        "eval",
        "--model",
        str(tmp_path),
        "--out",
        str(tmp_path / "e.json"),
        "--tasks",
        json.dumps([{"name": "demo_eng"}]),
        "--device",
        "cuda",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "mergebake eval: error: device 'cuda' requested but CUDA is not usable" in err


def test_eval_cli_auto_passes_the_resolved_device(monkeypatch, tmp_path):
    _cuda(monkeypatch, busy=True)
    import mergebake.evaluate

    seen = {}
    monkeypatch.setattr(mergebake.evaluate, "evaluate", lambda *a, **k: seen.update(k))
    (tmp_path / "config.json").write_text("{}")  # a checkpoint folder, as the eval checks
    args = [
        "eval",
        "--model",
        str(tmp_path),
        "--out",
        str(tmp_path / "e.json"),
        "--tasks",
        json.dumps([{"name": "demo_eng"}]),
    ]  # --device defaults to auto
    with pytest.warns(RuntimeWarning, match="falling back to CPU"):
        assert cli.main(args) == 0
    assert seen["device"] == "cpu"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("device")
    return {
        name: make_gemma3_text(d / name, seed=i) for i, name in enumerate(["base", "eng", "nob"])
    }


def _merge(models, out, device_choice):
    return merge_cell(
        RECIPES_DIR / "linear.yaml",
        base=models["base"],
        models={"eng": models["eng"], "nob": models["nob"]},
        parameters={"weight": 0.5},
        out=out,
        device=device_choice,
    )


def test_merge_falls_back_to_cpu_when_cuda_is_busy(monkeypatch, models, tmp_path):
    import mergekit.merge

    used = {}
    real_run = mergekit.merge.run_merge

    def run_merge(config, out_path, options, **kw):
        used["device"] = options.device
        return real_run(config, out_path, options=options, **kw)

    monkeypatch.setattr(mergekit.merge, "run_merge", run_merge)
    # The probe sees a busy GPU; mergekit then runs with torch as it really is.
    with monkeypatch.context() as m:
        _cuda(m, busy=True)
        with pytest.warns(RuntimeWarning, match="busy or unavailable"):
            assert device.resolve_device("auto") == "cpu"
    with pytest.warns(RuntimeWarning, match="falling back to CPU"):
        _merge(models, tmp_path / "m", "auto")
    assert used["device"] == "cpu"
    assert (tmp_path / "m" / "provenance.json").is_file()


def test_merge_on_cuda_fails_fast_and_leaves_nothing(monkeypatch, models, tmp_path):
    import mergekit.merge

    def never(*a, **k):
        raise AssertionError("mergekit must not run when the device is unusable")

    monkeypatch.setattr(mergekit.merge, "run_merge", never)
    _cuda(monkeypatch, busy=True)
    with pytest.raises(MergebakeError, match="'cuda' requested but CUDA is not usable"):
        _merge(models, tmp_path / "m", "cuda")
    assert not (tmp_path / "m").exists()
