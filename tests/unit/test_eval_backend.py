"""eval.batch_size (N, auto, auto:N) and eval.backend (hf | vllm): config checks, the model
arguments handed to lm-eval, the refusals of a vLLM eval where vLLM or a GPU is missing,
the SLURM GPU request, the unchanged hf commands, and auto vs 1 on the demo model (CPU).

vLLM is not installed here and there is no GPU: the vLLM path is tested up to the model
arguments (against lm-eval's ``VLLM.__init__`` signature, read from its source) and the
refusals; it is not run."""

from __future__ import annotations

import ast
import gzip
import importlib.util
import inspect
import json
import warnings
from pathlib import Path

import pytest
from _workflow import ROOT, demo_config

from mergebake import MergebakeError, cli, commands, demo
from mergebake import eval_backend as eb
from mergebake import evaluate as ev
from mergebake.config import ConfigError, ConfigWarning, load_config
from mergebake.workflow import Plan

FORMS = (
    "a positive integer (e.g. 8), auto (lm-eval finds the largest batch that fits, starting "
    "at eval.max_batch_size) or auto:N (N a positive integer: find it again N times as the "
    "requests get shorter)"
)
CELL = {"base": "4b-open", "group": "eng-nob", "method": "linear"}
NO_VLLM = (
    "key 'eval.backend' is vllm, but the vllm package is not installed here; install it "
    "with pip install 'lm_eval[vllm]' (vllm>=0.18); or set eval.backend: hf"
)
NO_GPU = (
    "key 'eval.backend' is vllm, but no CUDA GPU is visible here (torch.cuda.is_available() "
    "is False); vLLM runs on CUDA GPUs only: run the eval jobs on a GPU node (the SLURM "
    "profile asks for one per eval job with this backend); or set eval.backend: hf"
)


def _cfg(**eval_keys) -> dict:
    cfg = demo_config()
    cfg["eval"].update(eval_keys)
    return cfg


def _load(cfg: dict) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_config(cfg, source="c.yaml")
    return loaded, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


# ---------------------------------------------------------------- batch size


@pytest.mark.parametrize("value", [1, 8, 512, "1", "16", "auto", "auto:1", "auto:4"])
def test_accepted_batch_sizes_pass_unchanged(value):
    assert eb.check_batch_size(value) == value


@pytest.mark.parametrize(
    "value", [0, -1, 2.5, True, None, "0", "08", "auto:0", "auto:1.5", "auto:", "Auto", "max"]
)
def test_rejected_batch_sizes_name_the_key_and_the_forms(value):
    with pytest.raises(eb.BackendError) as err:
        eb.check_batch_size(value)
    assert str(err.value) == f"key 'eval.batch_size': {value!r} is not a batch size; write {FORMS}"


@pytest.mark.parametrize("value", ["max", 0, 2.5, "auto:0"])
def test_config_rejects_a_bad_batch_size(value):
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(batch_size=value), source="c.yaml")
    assert str(err.value) == (
        f"c.yaml: key 'eval.batch_size': {value!r} is not a batch size; write {FORMS}"
    )


def test_config_accepts_auto_forms_without_warnings():
    for value in ("auto", "auto:3", 4):
        loaded, notes = _load(_cfg(batch_size=value))
        assert loaded["eval"]["batch_size"] == value and notes == []
    loaded, notes = _load(_cfg(batch_size="auto", max_batch_size=16))
    assert loaded["eval"]["max_batch_size"] == 16 and notes == []
    _, notes = _load(_cfg(max_batch_size=16))
    assert notes == [
        "c.yaml: key 'eval.max_batch_size' only bounds eval.batch_size: auto; it is ignored "
        "with eval.batch_size 1"
    ]


def test_cli_refuses_a_bad_batch_size(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", "m", "--out", "o.json", "--tasks", "[]", "--batch-size", "x"])
    assert exit_.value.code == 2
    assert f"argument --batch-size: 'x': write {FORMS}" in capsys.readouterr().err


# ---------------------------------------------------------------- backend: config


def test_backend_defaults_to_hf_and_leaves_the_commands_as_they_were():
    loaded, notes = _load(demo_config())
    assert loaded["eval"]["backend"] == "hf" and notes == []
    assert loaded["eval"]["max_batch_size"] is None
    assert loaded["eval"]["vllm"] == {
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": None,
        "max_model_len": None,
    }
    plan = Plan(loaded, ROOT)
    # The argv of before eval.backend existed (a changed command reruns every eval).
    assert commands.build(plan, "eval_cell", CELL).argv() == [
        *["mergebake", "eval", "--model", "results/merged/4b-open/eng-nob__linear"],
        *["--out", "results/eval/4b-open/eng-nob__linear.json"],
        *["--tasks-file", "results/payloads/eval_tasks.json", "--seed", "1234"],
        *["--batch-size", "1", "--dtype", "float32", "--device", "auto"],
        *["--include-path", "resources/demo/tasks"],
    ]
    assert commands.command_line(plan, "eval_baseline", {"base": "1b-std", "row": "_base"}) == (
        "mergebake eval --model results/text/1b-std/_base --out results/eval/1b-std/_base.json"
        " --tasks-file results/payloads/eval_tasks.json --seed 1234 --batch-size 1"
        " --dtype float32 --device auto --include-path resources/demo/tasks"
    )
    assert plan.gpu("eval_cell") == plan.gpu("eval_baseline") == 0


def test_vllm_with_a_cpu_device_is_a_config_error():
    cfg = _cfg(backend="vllm")
    cfg["device"] = "cpu"
    with pytest.raises(ConfigError) as err:
        load_config(cfg, source="c.yaml")
    assert str(err.value) == (
        "c.yaml: key 'eval.backend': vllm runs on CUDA GPUs only, but the device is cpu; "
        "set device: auto or cuda, or eval.backend: hf to score on the CPU"
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tensor_parallel_size", 0, "0 is less than the minimum of 1"),
        ("gpu_memory_utilization", 0, "0 is less than or equal to the minimum of 0"),
        ("gpu_memory_utilization", 1.5, "1.5 is greater than the maximum of 1"),
        ("max_model_len", 0, "0 is less than the minimum of 1"),
        ("swap_space", 4, "Additional properties are not allowed ('swap_space' was unexpected)"),
    ],
)
def test_vllm_options_are_validated(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(backend="vllm", vllm={key: value}), source="c.yaml")
    where = "eval.vllm" if key == "swap_space" else f"eval.vllm.{key}"
    assert str(err.value).startswith(f"c.yaml: key '{where}': {message}")


def test_config_warns_about_ignored_or_slow_vllm_settings():
    _, notes = _load(_cfg(vllm={"max_model_len": 4096}))
    assert notes == [
        "c.yaml: key 'eval.vllm' is set but eval.backend is hf, so it is ignored; "
        "set eval.backend: vllm to use it"
    ]
    _, notes = _load(_cfg(backend="vllm"))
    assert notes == [
        "c.yaml: key 'eval.batch_size' is 1 with eval.backend vllm: lm-eval hands vLLM that "
        "many requests at a time; auto lets vLLM batch them all itself (faster)"
    ]
    _, notes = _load(_cfg(backend="vllm", batch_size="auto"))
    assert notes == []


def test_vllm_commands_and_slurm_gpus():
    vllm = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "max_model_len": 4096}
    cfg, _ = _load(_cfg(backend="vllm", batch_size="auto", vllm=vllm))
    plan = Plan(cfg, ROOT)
    argv = commands.build(plan, "eval_cell", CELL).argv()
    assert argv[argv.index("--batch-size") :] == [
        *["--batch-size", "auto", "--dtype", "float32", "--device", "auto"],
        *["--include-path", "resources/demo/tasks", "--backend", "vllm"],
        *["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8"],
        *["--max-model-len", "4096"],
    ]
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.backend, args.batch_size, args.tensor_parallel_size) == ("vllm", "auto", 2)
    assert (args.gpu_memory_utilization, args.max_model_len) == (0.8, 4096)
    # device auto: a vLLM eval still asks SLURM for its GPUs (one per tensor-parallel rank);
    # bake and merge keep the config's device
    assert plan.gpu("eval_cell") == plan.gpu("eval_baseline") == 2
    assert plan.job_resources("eval_cell", CELL)["gpu"] == 2
    assert plan.gpu("merge") == plan.gpu("bake") == 0
    cfg, _ = _load(_cfg(backend="vllm", batch_size="auto"))
    plan = Plan(cfg, ROOT)
    assert plan.gpu("eval_cell") == 1
    argv = commands.build(plan, "eval_cell", CELL).argv()
    assert argv[-2:] == ["--backend", "vllm"]  # options at lm-eval's defaults are left out


# ---------------------------------------------------------------- model arguments


def _vllm_init_parameters() -> tuple[set[str], bool, str]:
    """Named parameters of lm-eval's ``VLLM.__init__``, whether it takes ``**kwargs``, and
    the module source; read with ``ast`` because importing the module imports vLLM."""
    spec = importlib.util.find_spec("lm_eval.models.vllm_causallms")
    source = Path(spec.origin).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "VLLM":
            init = next(n for n in node.body if getattr(n, "name", "") == "__init__")
            names = {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}
            return names, init.args.kwarg is not None, source
    raise AssertionError("no class VLLM in lm_eval.models.vllm_causallms")


def test_vllm_model_args_are_what_lm_evals_vllm_model_accepts():
    from lm_eval.models import MODEL_MAPPING

    assert MODEL_MAPPING["vllm"] == "lm_eval.models.vllm_causallms:VLLM"
    opts = eb.VllmOptions(tensor_parallel_size=2, gpu_memory_utilization=0.85, max_model_len=2048)
    lm = eb.lm_settings(
        "vllm",
        pretrained="/m",
        dtype="bfloat16",
        seed=7,
        batch_size="auto",
        max_batch_size=32,
        device="auto",
        vllm=opts,
    )
    assert lm.simple_evaluate_kwargs() == {
        "model": "vllm",
        "model_args": {
            "pretrained": "/m",
            "dtype": "bfloat16",
            "trust_remote_code": False,
            "seed": 7,
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.85,
            "max_model_len": 2048,
        },
        "batch_size": "auto",
        "max_batch_size": 32,
        "device": None,  # lm-eval's vLLM model ignores it; simple_evaluate drops None
    }
    named, takes_kwargs, source = _vllm_init_parameters()
    assert {"batch_size", "max_batch_size"} <= named  # simple_evaluate adds these two
    assert set(lm.model_args) - named == {"gpu_memory_utilization"}
    # ... which VLLM forwards, with any other keyword, to vllm.LLM
    assert takes_kwargs and "self.model_args.update(kwargs)" in source
    assert "LLM(**self.model_args)" in source
    # defaults: only what lm-eval's own defaults would not give is passed
    plain = eb.lm_settings("vllm", pretrained="/m", device="cuda").model_args
    assert plain == {
        "pretrained": "/m",
        "dtype": "auto",
        "trust_remote_code": False,
        "seed": 1234,
        "tensor_parallel_size": 1,
    }


def test_hf_model_args_are_unchanged():
    lm = eb.lm_settings("hf", pretrained="/m", dtype="float32", batch_size="1", device="cpu")
    assert lm.simple_evaluate_kwargs() == {
        "model": "hf",
        "model_args": {"pretrained": "/m", "dtype": "float32", "trust_remote_code": False},
        "batch_size": "1",
        "max_batch_size": None,
        "device": "cpu",
    }
    from lm_eval.models.huggingface import HFLM

    params = inspect.signature(HFLM.__init__).parameters
    assert set(lm.model_args) | {"batch_size", "max_batch_size", "device"} <= set(params)
    assert params["max_batch_size"].default == eb.HF_MAX_BATCH_SIZE  # the bound of auto


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"backend": "sglang"},
            "key 'eval.backend': 'sglang' is not an eval backend; write one of hf, vllm",
        ),
        (
            {"backend": "vllm", "device": "cuda:1"},
            "key 'eval.backend': vllm ignores device 'cuda:1' (it uses the GPUs "
            "CUDA_VISIBLE_DEVICES shows); pass device auto or cuda and set "
            "CUDA_VISIBLE_DEVICES to choose the GPU",
        ),
        (
            {"backend": "hf", "max_batch_size": 0},
            "key 'eval.max_batch_size': 0; write an integer >= 1, or null for lm-eval's default",
        ),
    ],
)
def test_lm_settings_refusals(kwargs, message):
    backend = kwargs.pop("backend")
    with pytest.raises(eb.BackendError) as err:
        eb.lm_settings(backend, pretrained="/m", **kwargs)
    assert str(err.value) == message


def test_vllm_options_refuse_values_out_of_range():
    with pytest.raises(eb.BackendError, match=r"^key 'eval.vllm.tensor_parallel_size': 0;"):
        eb.VllmOptions(tensor_parallel_size=0)
    with pytest.raises(eb.BackendError, match=r"^key 'eval.vllm.gpu_memory_utilization': 1.2;"):
        eb.VllmOptions(gpu_memory_utilization=1.2)
    with pytest.raises(eb.BackendError, match=r"^key 'eval.vllm.max_model_len': True;"):
        eb.VllmOptions(max_model_len=True)


# ---------------------------------------------------------------- refusals at job start


def test_vllm_requirement_comes_from_lm_evals_metadata():
    assert eb.vllm_requirement() == "vllm>=0.18"  # lm-eval 0.4.13's `vllm` extra


def test_refused_without_vllm():
    assert importlib.util.find_spec("vllm") is None  # this machine: vLLM not installed
    with pytest.raises(eb.BackendError) as err:
        eb.check_vllm_runtime()
    assert str(err.value) == NO_VLLM


def test_refused_with_a_vllm_older_than_lm_eval_needs(monkeypatch):
    import importlib.metadata
    import importlib.util as iu

    monkeypatch.setattr(iu, "find_spec", lambda name: object() if name == "vllm" else None)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.2")
    assert eb.vllm_problem() == (
        "vllm 0.9.2 is installed but lm-eval needs vllm>=0.18; upgrade with "
        "pip install 'lm_eval[vllm]'"
    )
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.18.1")
    assert eb.vllm_problem() is None


def test_refused_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(eb, "vllm_problem", lambda: None)  # as if vLLM were installed
    assert not torch.cuda.is_available()  # this machine: no GPU
    with pytest.raises(eb.BackendError) as err:
        eb.check_vllm_runtime()
    assert str(err.value) == NO_GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(eb.BackendError) as err:
        eb.check_vllm_runtime(2)
    assert str(err.value).startswith(
        "key 'eval.backend' is vllm, but eval.vllm.tensor_parallel_size is 2 but only 1 "
        "CUDA GPU(s) are visible here; lower it or run the job where that many GPUs are visible"
    )
    eb.check_vllm_runtime(1)  # one GPU, one rank: nothing to refuse


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fail the test if evaluate() gets as far as loading tasks or a model."""
    import lm_eval

    def boom(*a, **k):
        raise AssertionError("tasks or model loaded before the backend check")

    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)
    monkeypatch.setattr(ev, "_task_manager", boom)


def test_evaluate_refuses_vllm_before_loading_anything(tmp_path, nothing_heavy):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    out = tmp_path / "e.json"
    tasks = [{"name": "demo_eng", "num_fewshot": 0}]
    with pytest.raises(MergebakeError) as err:
        ev.evaluate(tmp_path / "m", out, tasks=tasks, backend="vllm", device="auto")
    assert str(err.value) == NO_VLLM
    with pytest.raises(MergebakeError) as err:
        ev.evaluate(tmp_path / "m", out, tasks=tasks, backend="vllm", device="cpu")
    assert str(err.value).startswith("key 'eval.backend': vllm runs on CUDA GPUs only")
    assert not out.exists() and not ev.samples_path(out).exists()


def test_eval_cli_refuses_vllm_and_does_not_resolve_the_device(capsys, tmp_path, nothing_heavy):
    (tmp_path / "config.json").write_text("{}")
    args = ["eval", "--model", str(tmp_path), "--out", str(tmp_path / "e.json")]
    args += ["--tasks", '[{"name": "demo_eng"}]', "--backend", "vllm", "--batch-size", "auto"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err == f"mergebake eval: error: {NO_VLLM}\n"


def test_validate_and_preflight_warn_but_do_not_fail(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_cfg(backend="vllm", batch_size="auto")))
    assert cli.main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: valid; 16 cell(s)")
    warn = (
        f"mergebake validate: warning: {path}: key 'eval.backend' is vllm, but the vllm "
        "package is not installed here; install it with pip install 'lm_eval[vllm]' "
        "(vllm>=0.18); the eval jobs will refuse to start unless they run where it is "
        "(e.g. GPU nodes with vLLM installed)"
    )
    assert captured.err.splitlines()[0] == warn
    assert "no CUDA GPU is visible here" in captured.err.splitlines()[1]
    from mergebake.preflight import preflight

    cfg = load_config(path)
    notes = preflight(cfg, workdir=tmp_path, check_token=False, check_disk=False)
    assert [n for n in notes if "eval.backend" in n] == eb.environment_notes(cfg["eval"])
    assert len(eb.environment_notes(cfg["eval"])) == 2
    assert eb.environment_notes(load_config(demo_config())["eval"]) == []


# ---------------------------------------------------------------- auto on the CPU


@pytest.fixture(scope="module")
def demo_evals(tmp_path_factory):
    """The demo's 1b base scored on the demo tasks (CPU) with batch sizes 1, auto and auto:2:
    ``{batch size: (eval JSON path, its data, its samples file, lm-eval's raw samples)}``."""
    import lm_eval

    root = tmp_path_factory.mktemp("evalbk")
    demo.make_base(root / "base", arch="text", num_layers=2, seed=101)
    demo.write_tasks(root / "tasks")
    tasks = [{"name": demo.task_name(s), "num_fewshot": 0} for s in demo.SKILLS]
    real, raw = lm_eval.simple_evaluate, {}

    def spy(*a, **k):  # keeps lm-eval's own samples (log-likelihoods), which evaluate drops
        results = real(*a, **k)
        raw[k["batch_size"]] = results["samples"]
        return results

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval, "simple_evaluate", spy)
        for bs in (1, "auto", "auto:2"):
            path = root / f"{str(bs).replace(':', '_')}.json"
            ev.evaluate(
                root / "base",
                path,
                tasks=tasks,
                include_path=root / "tasks",
                batch_size=bs,
                dtype="float32",
                device="cpu",
            )
            samples = json.loads(gzip.decompress(ev.samples_path(path).read_bytes()))
            out[bs] = (path, json.loads(path.read_text()), samples, raw[bs])
    return out


def _loglikelihoods(raw: dict) -> dict[tuple[str, int], list[float]]:
    """``{(task, doc_id): [log-likelihood of each choice]}`` from lm-eval's samples."""
    return {
        (task, e["doc_id"]): [float(r[0][0]) for r in e["resps"]]
        for task, entries in raw.items()
        for e in entries
    }


def test_auto_batch_size_gives_the_scores_of_batch_size_1_on_cpu(demo_evals):
    path, one, one_samples, one_raw = demo_evals[1]
    assert "auto_batch_sizes" not in one["mergebake"] and "backend" not in one["mergebake"]
    assert one["config"]["batch_size"] == 1
    # the untrained demo base's scores at batch size 1 (20 documents per task)
    assert ev.load_scores(path) == {
        "demo_eng": {"acc,none": 0.3, "acc_norm,none": 0.25},
        "demo_nob": {"acc,none": 0.35, "acc_norm,none": 0.3},
    }
    ref = _loglikelihoods(one_raw)
    assert len(ref) == 40
    for bs in ("auto", "auto:2"):
        p, data, samples, raw = demo_evals[bs]
        assert data["config"]["batch_size"] == bs
        assert ev.load_scores(p) == ev.load_scores(path)
        assert samples == one_samples  # every document's metric values, not only the means
        # padded batches of 64 change fp32 log-likelihoods by ulps (1.4e-6 seen at ~-7)
        got = _loglikelihoods(raw)
        assert got.keys() == ref.keys()
        for key, lls in ref.items():
            assert got[key] == pytest.approx(lls, rel=1e-6, abs=1e-5)
    # lm-eval's detection on the CPU: five forward passes at its max_batch_size (64) fit
    assert demo_evals["auto"][1]["mergebake"]["auto_batch_sizes"] == [64]
    assert demo_evals["auto:2"][1]["mergebake"]["auto_batch_sizes"] == [64, 64]
