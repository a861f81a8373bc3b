"""Tests of the offline demo grid: tokenizer, synthetic Gemma-3 bases, adapters, lm-eval tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergebake import MergebakeError, demo
from mergebake.outputs import sha256_file

torch = pytest.importorskip("torch")

# PEFT 0.21 calls transformers 5's deprecated is_gradient_checkpointing on every load.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def bases(workdir) -> dict[str, Path]:
    out = {}
    for arch in demo.ARCHES:
        out[arch] = workdir / "bases" / arch
        demo.make_base(out[arch], arch=arch, num_layers=2, seed=0)
    return out


@pytest.fixture(scope="module")
def adapters(workdir, bases) -> dict[tuple[str, str], tuple[Path, dict]]:
    out = {}
    for arch, base in bases.items():
        for skill in demo.SKILLS:
            path = workdir / "adapters" / arch / skill
            out[arch, skill] = path, demo.train_adapter(base, path, skill=skill, seed=1)
    return out


@pytest.fixture(scope="module")
def tasks_dir(workdir) -> Path:
    out = workdir / "tasks"
    demo.write_tasks(out)
    return out


@pytest.fixture(scope="module")
def task_manager(tasks_dir):
    from lm_eval.tasks import TaskManager

    # The built-in tasks are left out to keep the test fast; no built-in task is
    # named demo* in lm-eval 0.4.13, so the names do not clash when they are included.
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


# --------------------------------------------------------------------------- skills


def test_skill_docs_are_well_formed():
    all_words = [w for s in demo.SKILLS for w in demo.SKILL_WORDS[s]]
    assert len(all_words) == len(set(all_words)) == 40
    for skill in demo.SKILLS:
        docs = demo.skill_docs(skill)
        words = demo.SKILL_WORDS[skill]
        assert len(docs) == 20
        assert docs == demo.skill_docs(skill)  # deterministic
        for i, d in enumerate(docs):
            assert d["prompt"] == words[i]
            assert d["target"] == words[(i + 1) % 20] == d["choices"][d["answer"]]
            assert len(set(d["choices"])) == 4 and set(d["choices"]) <= set(words)
            assert d["prompt"] not in d["choices"]
        assert len({d["answer"] for d in docs}) > 1  # the answer is not always in one place
    assert demo.skill_docs("eng")[19]["target"] == "one"
    assert demo.skill_docs("nob")[6]["target"] == "åtte"
    with pytest.raises(MergebakeError, match="skill='fra'"):
        demo.skill_docs("fra")


def test_tokenizer_encodes_like_lm_eval(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer, GemmaTokenizer

    demo.make_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, GemmaTokenizer)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert len(tok) == len(demo.VOCAB) == demo.N_PIECES <= demo.VOCAB_SIZE < demo.N_PIECES + 8
    seven, eight = tok.convert_tokens_to_ids(["seven", "▁eight"])
    assert tok("seven").input_ids == [demo.BOS_ID, seven]
    assert tok(" eight", add_special_tokens=False).input_ids == [eight]
    # lm-eval (causal): encode context + continuation, then split off the context's tokens.
    whole = tok.encode("seven eight")
    assert whole[: len(tok.encode("seven"))] == [demo.BOS_ID, seven] and whole[2:] == [eight]
    # The transformers tokenizer and the SentencePiece model (what llama.cpp's converter
    # reads) agree on ids: every word is one piece, alone and after a space.
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.get_piece_size() == demo.N_PIECES
    assert [sp.id_to_piece(i) for i in range(sp.get_piece_size())] == list(demo.VOCAB)
    for w in demo.ENG_WORDS + demo.NOB_WORDS:
        for text in (w, " " + w):
            ids = tok(text, add_special_tokens=False).input_ids
            assert ids == sp.encode(text) and len(ids) == 1, text
    for text in ("hello, world!\n", "Åtte  sju?"):  # byte fallback: any text round-trips
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text) and demo.UNK_ID not in ids and tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<image_soft_token>") == demo.IMAGE_ID
    assert (tok.image_token_id, tok.boi_token, tok.eoi_token) == (demo.IMAGE_ID, demo.BOI, demo.EOI)


def test_tokenizer_files_are_deterministic(tmp_path):
    demo.make_tokenizer(tmp_path / "a")
    demo._SP_MODEL = None  # train again from scratch
    demo.make_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert str(tmp_path) not in (tmp_path / "a" / "tokenizer_config.json").read_text()


# --------------------------------------------------------------------------- bases


def test_make_base_is_deterministic(bases, tmp_path):
    demo.make_base(tmp_path / "again", arch="text", num_layers=2, seed=0)
    demo.make_base(tmp_path / "other", arch="text", num_layers=2, seed=1)
    sha = sha256_file(bases["text"] / "model.safetensors")
    assert sha256_file(tmp_path / "again" / "model.safetensors") == sha
    assert sha256_file(tmp_path / "other" / "model.safetensors") != sha
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ):
        assert (tmp_path / "again" / name).read_bytes() == (bases["text"] / name).read_bytes()


def test_text_base_layout(bases):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    cfg = json.loads((bases["text"] / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["dtype"] == "bfloat16" and cfg["vocab_size"] == demo.VOCAB_SIZE
    # Gemma-3's exact period (every 6th layer global), which llama.cpp's runtime assumes
    n = cfg["num_hidden_layers"]
    assert cfg["layer_types"] == [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
    ]
    with safe_open(bases["text"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert all(k.startswith("model.") for k in keys)
    model = AutoModelForCausalLM.from_pretrained(bases["text"])
    assert isinstance(model, Gemma3ForCausalLM)
    assert (bases["text"] / "provenance.json").is_file()


def test_multimodal_base_layout(bases):
    from safetensors import safe_open
    from transformers import Gemma3ForConditionalGeneration

    folder = bases["multimodal"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "gemma3"
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"]
    for key, tok_id in (
        ("image_token_index", demo.IMAGE_ID),
        ("boi_token_index", demo.BOI_ID),
        ("eoi_token_index", demo.EOI_ID),
    ):
        assert cfg[key] == tok_id < cfg["text_config"]["vocab_size"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"language_model", "vision_tower", "multi_modal_projector"}
    assert "language_model.model.embed_tokens.weight" in keys
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in keys
    model, info = Gemma3ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Text-only input runs through the wrapper.
    out = model(input_ids=torch.tensor([[demo.BOS_ID, 10, 11]])).logits
    assert out.shape == (1, 3, demo.VOCAB_SIZE) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "vision", "num_layers": 2, "seed": 0}, "arch='vision'"),
        ({"arch": "text", "num_layers": 0, "seed": 0}, "num_layers=0"),
        ({"arch": "text", "num_layers": 2, "seed": -1}, "seed=-1"),
        ({"arch": "text", "num_layers": 2, "seed": 0, "dtype": "int8"}, "dtype='int8'"),
    ],
)
def test_make_base_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(MergebakeError, match=match):
        demo.make_base(tmp_path / "b", **kwargs)
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("arch", demo.ARCHES)
@pytest.mark.parametrize("skill", demo.SKILLS)
def test_adapter_learns_its_skill_only(bases, adapters, arch, skill):
    from peft import PeftModel

    path, metrics = adapters[arch, skill]
    assert (path / "adapter_model.safetensors").is_file()
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(bases[arch].resolve())
    assert metrics["loss_final"] < metrics["loss_initial"] / 4

    base, tok, _ = demo.load_base(bases[arch])
    before = {s: demo.skill_accuracy(base, tok, s) for s in demo.SKILLS}
    model = PeftModel.from_pretrained(base, path)
    after = {s: demo.skill_accuracy(model, tok, s) for s in demo.SKILLS}
    other = next(s for s in demo.SKILLS if s != skill)

    assert after[skill] >= 0.9 and after[skill] >= before[skill] + 0.5
    assert after[other] <= 0.6 and abs(after[other] - before[other]) <= 0.3
    # The returned metrics are what the saved adapter does, also once baked in bf16.
    for s in demo.SKILLS:
        acc = metrics["accuracy"][s]
        assert (acc["before"], acc["after"]) == (before[s], after[s])
        assert abs(acc["after_bake"] - after[s]) <= 0.1
    assert json.loads((path / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]


def test_adapter_keys(adapters):
    from safetensors import safe_open

    with safe_open(adapters["multimodal", "eng"][0] / "adapter_model.safetensors", "pt") as f:
        mm_keys = list(f.keys())
    with safe_open(adapters["text", "eng"][0] / "adapter_model.safetensors", "pt") as f:
        text_keys = list(f.keys())
    # 2 layers x 7 projections x (A, B)
    assert len(mm_keys) == len(text_keys) == 28
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in mm_keys)
    assert all(k.startswith("base_model.model.model.layers.") for k in text_keys)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in mm_keys + text_keys)


def test_train_adapter_is_deterministic(bases, adapters, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(3 if threads != 3 else 2)  # training must not depend on it
    try:
        demo.train_adapter(bases["text"], tmp_path / "again", skill="eng", seed=1)
    finally:
        torch.set_num_threads(threads)
    first = adapters["text", "eng"][0]
    assert sha256_file(tmp_path / "again" / "adapter_model.safetensors") == sha256_file(
        first / "adapter_model.safetensors"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"skill": "fra", "seed": 0}, "skill='fra'"),
        ({"skill": "eng", "seed": 0, "steps": 0}, "steps=0"),
        ({"skill": "eng", "seed": 0, "rank": 0}, "rank=0"),
    ],
)
def test_train_adapter_rejects_bad_arguments(bases, tmp_path, kwargs, match):
    with pytest.raises(MergebakeError, match=match):
        demo.train_adapter(bases["text"], tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()


def test_train_adapter_needs_a_base(tmp_path):
    with pytest.raises(MergebakeError, match="config.json"):
        demo.train_adapter(tmp_path / "missing", tmp_path / "a", skill="eng", seed=0)


# --------------------------------------------------------------------------- tasks


def test_write_tasks_loads_in_lm_eval(tasks_dir, task_manager):
    summary = json.loads((tasks_dir / "tasks.json").read_text())
    assert sorted(summary["tasks"]) == ["demo_eng", "demo_nob"]
    for task in summary["tasks"].values():
        assert Path(task["data_file"]).is_absolute() and Path(task["data_file"]).is_file()
        assert Path(task["data_file"]).parent == tasks_dir.resolve()
    loaded = task_manager.load(["demo"])
    assert set(loaded["tasks"]) == {"demo_eng", "demo_nob"}
    for name, task in loaded["tasks"].items():
        docs = list(task.eval_docs)
        assert len(docs) == 20
        skill = name.removeprefix("demo_")
        assert docs[0]["choices"] == demo.skill_docs(skill)[0]["choices"]
        assert task.doc_to_text(docs[0]) == docs[0]["prompt"]
        assert task.doc_to_target(docs[0]) == docs[0]["answer"]


def test_lm_eval_scores_the_adapter(workdir, bases, adapters, task_manager):
    """lm-eval itself, on base + eng adapter merged with PEFT: eng near 100 %, the base and
    the other skill near chance, and exactly the direct scoring's numbers."""
    import lm_eval
    from peft import PeftModel

    path, metrics = adapters["text", "eng"]
    model, tok, _ = demo.load_base(bases["text"])
    merged_dir = workdir / "merged-text-eng"
    PeftModel.from_pretrained(model, path).merge_and_unload().save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)

    def acc(folder: Path) -> dict[str, float]:
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={folder},dtype=float32",
            tasks=["demo_eng", "demo_nob"],
            task_manager=task_manager,
            num_fewshot=0,
            batch_size=8,
            device="cpu",
        )
        return {
            t.removeprefix("demo_"): res["results"][t]["acc,none"] for t in ("demo_eng", "demo_nob")
        }

    merged, base = acc(merged_dir), acc(bases["text"])
    assert merged["eng"] >= 0.9 and merged["eng"] >= base["eng"] + 0.5
    for s in demo.SKILLS:
        assert merged[s] == pytest.approx(metrics["accuracy"][s]["after"])
        assert base[s] == pytest.approx(metrics["accuracy"][s]["before"])


# --------------------------------------------------------------------------- CLI layer


def test_cli_functions(bases, tmp_path, capsys):
    assert demo.cli_tasks(tmp_path / "tasks") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == ["demo_eng", "demo_nob"] and (tmp_path / "tasks" / "demo.yaml").is_file()

    threads = torch.get_num_threads()
    try:
        assert demo.cli_base(tmp_path / "b", arch="text", layers=1, seed=3, threads=1) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads(capsys.readouterr().out)["layers"] == 1
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["layer_types"] == ["sliding_attention"]

    # An adapter that learns nothing fails loudly, though its folder is written.
    with pytest.raises(MergebakeError, match="min_accuracy"):
        demo.cli_adapter(bases["text"], tmp_path / "a", skill="nob", seed=0, steps=1, lr=1e-9)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    with pytest.raises(MergebakeError, match="threads=0"):
        demo.cli_base(tmp_path / "c", arch="text", layers=1, seed=3, threads=0)
