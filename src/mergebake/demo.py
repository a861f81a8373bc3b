"""The offline demo grid: a tiny synthetic Gemma-3 family, two skills, LoRA adapters, tasks.

Everything here is generated deterministically on the CPU with the real classes, so the
default config runs with no downloads:

- :func:`make_tokenizer` writes a Gemma tokenizer: a SentencePiece model trained on the
  skills' text (``tokenizer.model``, which llama.cpp's converter reads) and its
  ``transformers`` form;
- :func:`make_base` builds a randomly initialised ``Gemma3ForCausalLM`` (``arch="text"``,
  like Gemma-3 1b) or ``Gemma3ForConditionalGeneration`` with a small SigLIP vision tower
  (``arch="multimodal"``, like Gemma-3 4b/12b) and saves it with ``save_pretrained``;
- :func:`train_adapter` trains a PEFT LoRA adapter for a few seconds on one skill;
- :func:`write_tasks` writes lm-eval task YAMLs over local JSONL files measuring the skills.

The two skills are counting in English (``eng``: "seven" → "eight") and in Norwegian Bokmål
(``nob``: "sju" → "åtte"), each over the numbers one to twenty with twenty wrapping round to
one. Every word is its own token and no word is shared between the languages, so an adapter
trained on one skill leaves the other at chance. Training data and task documents both come
from :func:`skill_docs`.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import MergebakeError
from .outputs import atomic_dir, write_json, write_provenance

# --------------------------------------------------------------------------- skills

ENG_WORDS = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
NOB_WORDS = (
    "en",
    "to",
    "tre",
    "fire",
    "fem",
    "seks",
    "sju",
    "åtte",
    "ni",
    "ti",
    "elleve",
    "tolv",
    "tretten",
    "fjorten",
    "femten",
    "seksten",
    "sytten",
    "atten",
    "nitten",
    "tjue",
)
#: Skill name → the counting sequence it teaches (each word's successor is the next one,
#: the last wraps round to the first).
SKILL_WORDS: dict[str, tuple[str, ...]] = {"eng": ENG_WORDS, "nob": NOB_WORDS}
#: The skill names, in a fixed order; each is also an adapter name in the demo grid.
SKILLS: tuple[str, ...] = tuple(SKILL_WORDS)
#: Number of answer choices per document (so chance accuracy is 1/4).
N_CHOICES = 4
_DISTRACTOR_SEED = 20250611

# --------------------------------------------------------------------------- tokenizer

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, BOI, EOI, IMAGE)
PAD_ID, EOS_ID, BOS_ID, UNK_ID, BOI_ID, EOI_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
#: Pieces of the demo's SentencePiece model (:func:`train_sentencepiece`): the 7 special
#: tokens, 256 byte-fallback pieces, the BPE merges learned from the skills' text, and the
#: characters. Checked against the trained model by the tests.
N_PIECES = 533
#: The model's vocabulary size: the tokenizer's, padded up to a multiple of 8.
VOCAB_SIZE = -(-N_PIECES // 8) * 8
MAX_POSITIONS = 128
#: Weight init std of the demo bases. Gemma-3's default (0.02) gives tied embeddings so
#: short that no logit can exceed about 1.3, which caps what an adapter can learn and lets
#: a merge of two adapters wipe one skill out; 0.1 lets the adapters reach confident
#: answers (train loss ~0.1) that survive baking in bf16 and merging.
INIT_STD = 0.1

# --------------------------------------------------------------------------- models

#: ``text``/``multimodal``: Gemma-3 (1b-style / 4b, 12b-style); ``gemma4``: a 12B/31B-style
#: ``Gemma4ForConditionalGeneration`` (vision tower); ``gemma4-e``: an E2B/E4B-style one
#: (per-layer input embeddings, kv-shared upper half, vision and audio towers, and the
#: redundant k/v tensors of the kv-shared layers the released checkpoints carry).
ARCHES = ("text", "multimodal", "gemma4", "gemma4-e")
GEMMA4_ARCHES = ("gemma4", "gemma4-e")
DTYPES = ("bfloat16", "float16", "float32")
MAX_LAYERS = 16
TEXT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: PEFT ``target_modules`` regex for multimodal bases: the language model's linear layers
#: only (the SigLIP tower has q/k/v projections too, which must stay untouched).
MULTIMODAL_TARGET_REGEX = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
DEFAULT_STEPS = 60
DEFAULT_LR = 2e-2


def _torch():
    import torch

    return torch


def skill_docs(skill: str) -> list[dict[str, Any]]:
    """The documents of one skill, deterministic and identical on every machine.

    Each document is ``{"id": int, "prompt": str, "choices": list[str] (4 words of the
    skill's language), "answer": int (index of the correct choice in choices), "target":
    str (the correct word)}``; there is one per word of the skill (20), and the correct
    choice is the word's successor. The 3 distractors are other words of the same language,
    never the prompt itself. Raises :class:`MergebakeError` for an unknown ``skill``.
    """
    words = _skill_words(skill)
    n = len(words)
    rng = random.Random(f"{_DISTRACTOR_SEED}-{skill}")
    docs = []
    for i, word in enumerate(words):
        target = words[(i + 1) % n]
        pool = [w for w in words if w not in (word, target)]
        choices = rng.sample(pool, N_CHOICES - 1)
        answer = rng.randrange(N_CHOICES)
        choices.insert(answer, target)
        docs.append(
            {"id": i, "prompt": word, "choices": choices, "answer": answer, "target": target}
        )
    return docs


def _skill_words(skill: str) -> tuple[str, ...]:
    if skill not in SKILL_WORDS:
        raise MergebakeError(f"skill={skill!r}: unknown skill; choose one of {list(SKILLS)}")
    return SKILL_WORDS[skill]


# --------------------------------------------------------------------------- tokenizer


def tokenizer_corpus() -> list[str]:
    """The text the demo tokenizer is trained on, one sentence per item, in a fixed order.

    For each skill: its whole counting sequence on one line, then every word alone and every
    word followed by its successor (``"seven eight"``), so each word is seen both at the
    start of a text (no space before it) and after a space, as lm-eval presents a context
    and its continuation.
    """
    sentences = []
    for skill in SKILLS:
        words = SKILL_WORDS[skill]
        sentences.append(" ".join(words))
        for i, word in enumerate(words):
            sentences.append(word)
            sentences.append(f"{word} {words[(i + 1) % len(words)]}")
    return sentences


def train_sentencepiece() -> bytes:
    """Train the demo's SentencePiece model on :func:`tokenizer_corpus`; return its bytes.

    A BPE model trained by the ``sentencepiece`` library (``SentencePieceTrainer``) with
    Gemma's settings: ids ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then the image
    tokens ``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>`` (4-6, user
    defined symbols), byte fallback (256 ``<0xNN>`` pieces, so any text encodes), no dummy
    prefix, whitespace kept as ``▁``, identity normalisation. The vocabulary is left to
    grow until every word of both skills is one piece on its own and one piece with a
    leading ``▁`` (:data:`N_PIECES` pieces in all). Single-threaded on in-memory input,
    so the same library version gives the same bytes on every run (the returned bytes are
    a serialised ``ModelProto``, the ``tokenizer.model`` file Gemma checkpoints ship).
    """
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=4 * N_PIECES,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece=PAD,
        eos_piece=EOS,
        bos_piece=BOS,
        unk_piece=UNK,
        user_defined_symbols=[BOI, EOI, IMAGE],
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        character_coverage=1.0,
        max_sentencepiece_length=16,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _pieces() -> tuple[str, ...]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=_sentencepiece_model())
    return tuple(sp.id_to_piece(i) for i in range(sp.get_piece_size()))


_SP_MODEL: bytes | None = None


def _sentencepiece_model() -> bytes:
    global _SP_MODEL
    if _SP_MODEL is None:
        _SP_MODEL = train_sentencepiece()
    return _SP_MODEL


def __getattr__(name: str) -> Any:
    # VOCAB needs a trained model; computed on first use so importing this module stays cheap.
    if name == "VOCAB":
        return _pieces()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tokenizer_from_model(model_file: Path):
    from transformers import GemmaTokenizer

    # transformers' own SentencePiece -> tokenizers conversion (as for a Gemma checkpoint
    # that ships only tokenizer.model); the file path is dropped so no path is saved.
    kwargs = GemmaTokenizer.convert_to_native_format(vocab_file=str(model_file))
    kwargs.pop("vocab_file", None)
    return GemmaTokenizer(
        **kwargs,
        add_bos_token=True,
        mask_token=None,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE},
    )


def build_tokenizer():
    """The demo tokenizer as a ``transformers`` ``GemmaTokenizer``, built in memory.

    The SentencePiece model of :func:`train_sentencepiece`, converted by transformers' own
    SentencePiece converter into a BPE ``tokenizers`` backend with byte fallback, Gemma's
    ``" " -> "▁"`` normaliser and a post-processor that prepends ``<bos>`` (id 2). Every
    skill word is one token with and without a leading space, so
    ``tok("seven").input_ids == [2, id("seven")]`` and
    ``tok(" eight", add_special_tokens=False).input_ids == [id("▁eight")]``, which is how
    lm-eval encodes a context and its continuation. Token ids equal the SentencePiece ids
    (``len(tok) ==`` :data:`N_PIECES`).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "tokenizer.model"
        model_file.write_bytes(_sentencepiece_model())
        return _tokenizer_from_model(model_file)


def make_tokenizer(out: Path) -> None:
    """Save the demo tokenizer into the folder ``out``, as Gemma checkpoints ship theirs.

    Writes ``tokenizer.model`` (the SentencePiece model of :func:`train_sentencepiece`,
    which llama.cpp's ``convert_hf_to_gguf.py`` reads), and ``tokenizer.json`` and
    ``tokenizer_config.json`` (``tokenizer_class`` ``GemmaTokenizer``) with
    ``save_pretrained``, so ``AutoTokenizer.from_pretrained(out)`` works offline. The same
    library versions give the same bytes. ``out`` is created if needed and other files in
    it are left alone (the base models keep their tokenizer beside the weights).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / "tokenizer.model"
    model_file.write_bytes(_sentencepiece_model())
    _tokenizer_from_model(model_file).save_pretrained(out)


# --------------------------------------------------------------------------- bases


def _layer_types(num_layers: int) -> list[str]:
    """Gemma-3's local/global pattern exactly as the real checkpoints have it: every 6th
    layer global, the rest sliding-window. llama.cpp's Gemma-3 runtime assumes this period
    (its converter writes no per-layer pattern), so a demo base shorter than 6 layers is all
    sliding-window; with the demo's short prompts (under ``sliding_window`` tokens) that
    attends exactly as full attention would."""
    return [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)
    ]


def base_config(arch: str, num_layers: int):
    """The ``transformers`` config of a demo base.

    ``arch="text"``: a ``Gemma3TextConfig`` (hidden 64, MLP 128, 2 query heads and 1 KV
    head of dim 32, ``num_layers`` layers, vocabulary :data:`VOCAB_SIZE`, 128 positions).
    ``arch="multimodal"``: a ``Gemma3Config`` wrapping that text config and a one-layer
    SigLIP vision config (hidden 32, 56×56 images of 14×14 patches, 4 tokens per image).
    Raises :class:`MergebakeError` naming ``arch`` or ``num_layers`` when out of range.
    """
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    if arch not in ARCHES:
        raise MergebakeError(
            f"arch={arch!r}: unknown demo architecture; choose one of {list(ARCHES)}"
        )
    if (
        not isinstance(num_layers, int)
        or isinstance(num_layers, bool)
        or not 1 <= num_layers <= MAX_LAYERS
    ):
        raise MergebakeError(
            f"num_layers={num_layers!r}: must be an integer from 1 to {MAX_LAYERS}"
        )
    if arch in GEMMA4_ARCHES:
        return _gemma4_config(arch, num_layers)
    text = Gemma3TextConfig(
        **_text_shape(num_layers),
        query_pre_attn_scalar=32,
        layer_types=_layer_types(num_layers),
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
    )
    if arch == "text":
        text.architectures = ["Gemma3ForCausalLM"]
        return text
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        image_token_index=IMAGE_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return config


def _text_shape(num_layers: int) -> dict:
    """The text model's shapes every demo family shares (Gemma-3 and Gemma-4): hidden 64,
    MLP 128, 2 query heads and 1 KV head of dim 32, sliding window 32."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=32,
    )


def _gemma4_config(arch: str, num_layers: int):
    """The ``Gemma4Config`` of a ``gemma4`` or ``gemma4-e`` demo base: the Gemma-3 demo's
    text shapes (hidden 64, MLP 128, 2 query heads and 1 KV head of dim 32, global layers
    too) and a one-layer vision tower (hidden 32, 4x4 patches); ``gemma4-e`` adds per-layer
    input embeddings of 8 per layer, alternates local and global layers and shares the
    key/value states of the upper half (from 4 layers on), and a one-layer audio tower."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    e = arch == "gemma4-e"
    if e:
        layer_types = [
            "full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)
        ]
        layer_types[-1] = "full_attention"
    else:
        layer_types = _layer_types(num_layers)
        layer_types[-1] = "full_attention"  # Gemma-4 requires a global last layer
    text = Gemma4TextConfig(
        **_text_shape(num_layers),
        global_head_dim=32,
        layer_types=layer_types,
        hidden_size_per_layer_input=8 if e else 0,
        vocab_size_per_layer_input=VOCAB_SIZE,
        num_kv_shared_layers=num_layers // 2 if e and num_layers >= 4 else 0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
    )
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        position_embedding_size=64,
        pooling_kernel_size=2,
    )
    audio = None
    if e:
        audio = Gemma4AudioConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[8, 4],
            output_proj_dims=32,
        )
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    return config


def _add_kv_shared_tensors(folder: Path) -> None:
    """Write the ``k_proj``/``v_proj``/``k_norm`` of each kv-shared layer into
    ``model.safetensors`` (copies of the layer whose cache it reuses), as the released
    Gemma-4 E-series checkpoints carry them; transformers ignores them on load."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())["text_config"]
    n, shared = cfg["num_hidden_layers"], cfg["num_kv_shared_layers"]
    if not shared:
        return
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for i in range(n - shared, n):
        donor = n - shared - 1 - (n - 1 - i) % 2  # the last unshared layer of the same type
        for part in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            src = f"model.language_model.layers.{donor}.self_attn.{part}"
            tensors[f"model.language_model.layers.{i}.self_attn.{part}"] = tensors[src].clone()
    save_file(tensors, path, metadata={"format": "pt"})


def _model_class(arch: str):
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    if arch in GEMMA4_ARCHES:
        from transformers import Gemma4ForConditionalGeneration

        return Gemma4ForConditionalGeneration
    return Gemma3ForCausalLM if arch == "text" else Gemma3ForConditionalGeneration


def make_base(out: Path, *, arch: str, num_layers: int, seed: int, dtype: str = "bfloat16") -> None:
    """Generate a randomly initialised tiny Gemma-3 base model into the folder ``out``.

    ``arch`` is ``"text"`` (``Gemma3ForCausalLM``, keys ``model.*``; like Gemma-3 1b) or
    ``"multimodal"`` (``Gemma3ForConditionalGeneration``, keys ``language_model.model.*``,
    ``vision_tower.*``, ``multi_modal_projector.*``; like Gemma-3 4b/12b); see
    :func:`base_config` for the shapes. Weights are initialised by ``transformers`` after
    ``torch.manual_seed(seed)`` and saved with ``save_pretrained`` as ``model.safetensors``
    in ``dtype`` (``"bfloat16"``, ``"float16"`` or ``"float32"``), with ``config.json``,
    ``generation_config.json``, the demo tokenizer (:func:`make_tokenizer`) and
    ``provenance.json``. The same arguments give byte-identical files. ``out`` appears
    atomically and is replaced if it exists.

    Raises :class:`MergebakeError` naming ``arch``, ``num_layers``, ``seed`` or ``dtype``
    when invalid.
    """
    torch = _torch()
    if dtype not in DTYPES:
        raise MergebakeError(f"dtype={dtype!r}: choose one of {list(DTYPES)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise MergebakeError(f"seed={seed!r}: must be a non-negative integer")
    config = base_config(arch, num_layers)
    out = Path(out)
    with atomic_dir(out) as tmp:
        torch.manual_seed(seed)
        model = _model_class(arch)(config)
        model.to(getattr(torch, dtype))
        model.generation_config.max_length = MAX_POSITIONS
        model.save_pretrained(tmp)
        if arch == "gemma4-e":
            _add_kv_shared_tensors(tmp)
        make_tokenizer(tmp)
        write_provenance(
            tmp,
            step="demo-base",
            inputs={},
            params={"arch": arch, "num_layers": num_layers, "dtype": dtype},
            source={"generator": "mergebake.demo.make_base"},
            seed=seed,
        )


def _base_arch(base: Path) -> str:
    cfg_path = Path(base) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise MergebakeError(
            f"base={base}: no config.json; build it with make_base (mergebake demo-base) first"
        ) from None
    model_type = cfg.get("model_type")
    if model_type == "gemma3_text":
        return "text"
    if model_type == "gemma3":
        return "multimodal"
    if model_type == "gemma4":
        per_layer = (cfg.get("text_config") or {}).get("hidden_size_per_layer_input")
        return "gemma4-e" if per_layer else "gemma4"
    raise MergebakeError(
        f"{cfg_path}: model_type {model_type!r} is not a demo base "
        "(expected 'gemma3_text', 'gemma3' or 'gemma4')"
    )


# --------------------------------------------------------------------------- scoring


def _skill_tensors(skill: str, tokenizer) -> tuple[Any, Any, Any, Any]:
    """Token tensors of a skill: contexts [n, L] (with <bos>), choice ids [n, 4] (each
    choice is one token, encoded as lm-eval encodes a continuation), answers [n], and the
    target token ids [n]."""
    torch = _torch()
    docs = skill_docs(skill)
    contexts, choices = [], []
    for d in docs:
        contexts.append(tokenizer(d["prompt"]).input_ids)
        row = []
        for c in d["choices"]:
            ids = tokenizer(" " + c, add_special_tokens=False).input_ids
            if len(ids) != 1 or ids[0] == UNK_ID:
                raise MergebakeError(
                    f"choice {c!r} of skill {skill!r} is not one known token "
                    f"({ids}); the tokenizer does not match this module"
                )
            row.append(ids[0])
        choices.append(row)
    if len({len(c) for c in contexts}) != 1:
        raise MergebakeError(f"skill {skill!r}: prompts tokenize to different lengths")
    ctx = torch.tensor(contexts, dtype=torch.long)
    ch = torch.tensor(choices, dtype=torch.long)
    ans = torch.tensor([d["answer"] for d in docs], dtype=torch.long)
    return ctx, ch, ans, ch.gather(1, ans[:, None])[:, 0]


def skill_accuracy(model, tokenizer, skill: str) -> float:
    """Accuracy (0..1) of ``model`` on one skill's 4-way multiple choice, scored directly.

    For each document of :func:`skill_docs`, the choice with the highest log-probability
    as the next token after ``<bos> prompt`` wins, as lm-eval's ``acc`` decides for
    single-token continuations. ``model`` is any causal LM returning ``.logits``
    (``[batch, seq, vocab]``; a PEFT model, a multimodal Gemma-3); it is run in eval mode
    under ``torch.no_grad`` and left in the mode it was in.
    """
    torch = _torch()
    ctx, ch, ans, _ = _skill_tensors(skill, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ctx).logits[:, -1, :].float()
    finally:
        model.train(was_training)
    logp = torch.log_softmax(logits, dim=-1).gather(1, ch)
    return float((logp.argmax(dim=1) == ans).float().mean())


def load_base(base: Path, *, dtype: str = "float32"):
    """Load a demo base from ``base`` with its own class, in ``dtype``, in eval mode.

    Returns ``(model, tokenizer, arch)``. Raises :class:`MergebakeError` when ``base``
    holds no demo base.
    """
    torch = _torch()
    from transformers import AutoTokenizer

    base = Path(base)
    arch = _base_arch(base)
    if dtype not in DTYPES:
        raise MergebakeError(f"dtype={dtype!r}: choose one of {list(DTYPES)}")
    model = _model_class(arch).from_pretrained(
        base, dtype=getattr(torch, dtype), attn_implementation="eager"
    )
    model.eval()
    return model, AutoTokenizer.from_pretrained(base), arch


# --------------------------------------------------------------------------- adapters


def train_adapter(
    base: Path,
    out: Path,
    *,
    skill: str,
    seed: int,
    steps: int = DEFAULT_STEPS,
    rank: int = 8,
    alpha: int = 16,
    lr: float = DEFAULT_LR,
    checkpoints: Sequence[int] = (),
) -> dict[str, Any]:
    """Train a LoRA adapter on ``skill`` over the demo base in ``base``; save it to ``out``.

    The base is loaded in float32 with its own class; PEFT ``LoraConfig(r=rank,
    lora_alpha=alpha, lora_dropout=0, task_type="CAUSAL_LM")`` targets the seven linear
    projections of every text layer (for multimodal bases through the regex
    :data:`MULTIMODAL_TARGET_REGEX`, so the adapter's keys carry the wrapper's
    ``model.language_model.`` prefix, as real Gemma-3 4b+ adapters do). Training is
    full-batch Adam (``lr``) for ``steps`` steps on the 20 documents of the skill, with
    cross-entropy over the whole vocabulary on the answer token only; single-threaded
    and seeded with ``seed``, so the same inputs give byte-identical weights whatever the
    caller's thread count. The whole call takes 1–3 s on a small CPU (the loop itself
    0.5–1.5 s at the default 60 steps; the loss plateaus at ~0.1 nats by step 40).

    ``out`` (created atomically, replaced if present) receives PEFT's
    ``adapter_model.safetensors`` (float32 ``lora_A``/``lora_B`` weights) and
    ``adapter_config.json`` (``base_model_name_or_path`` = the base's absolute path), plus
    ``metrics.json`` and ``provenance.json``. With ``checkpoints`` (steps 1..``steps``),
    the adapter as it stands after each of those steps is also saved, as a PEFT adapter,
    to ``out/checkpoint-<step>/`` (what trainers such as transformers' ``Trainer`` write),
    and ``metrics.json`` gains ``checkpoints`` (the steps); without, the output is as
    before, byte for byte. Saving reads the weights only, so the final adapter does not
    depend on ``checkpoints``.

    Returns the metrics: ``skill``, ``arch``, ``steps``, ``rank``, ``alpha``, ``lr``,
    ``loss_initial`` and ``loss_final`` (mean cross-entropy in nats over the 20 documents),
    ``accuracy`` = ``{skill_name: {"before", "after", "after_bake"}}`` for every skill
    (fractions 0..1 from :func:`skill_accuracy`: the base alone in float32; base + adapter
    in float32; and base + adapter merged by PEFT's ``merge_and_unload`` into the base in
    its saved dtype, i.e. what the bake step produces), and ``seconds`` (wall time of the
    training loop; the only key not also written to ``metrics.json``).

    Raises :class:`MergebakeError` naming ``skill``, ``seed``, ``steps``, ``rank``,
    ``alpha`` or ``lr`` when invalid, or ``base`` when it holds no demo base.
    """
    torch = _torch()
    from peft import LoraConfig, get_peft_model

    _skill_words(skill)
    for name, value, lo in (
        ("steps", steps, 1),
        ("rank", rank, 1),
        ("alpha", alpha, 1),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise MergebakeError(f"{name}={value!r}: must be an integer >= {lo}")
    if not lr > 0:
        raise MergebakeError(f"lr={lr!r}: must be positive")
    saves = sorted(set(checkpoints))
    if any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= steps for n in saves):
        raise MergebakeError(f"checkpoints={list(checkpoints)!r}: steps must be 1..{steps}")
    base = Path(base).resolve()
    model, tokenizer, arch = load_base(base)
    saved_dtype = _saved_dtype(base)

    before = {s: skill_accuracy(model, tokenizer, s) for s in SKILLS}
    target_modules: str | list[str] = (
        list(TEXT_TARGET_MODULES) if arch == "text" else MULTIMODAL_TARGET_REGEX
    )
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        with _quiet_peft():
            peft_model = get_peft_model(model, lora)
        ctx, _, _, targets = _skill_tensors(skill, tokenizer)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        peft_model.train()
        t0 = time.perf_counter()
        losses = []
        saved: dict[int, Path] = {}
        stage = None
        if saves:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=Path(out).parent))
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            logits = peft_model(input_ids=ctx).logits[:, -1, :]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step in saves:
                saved[step] = stage / f"checkpoint-{step}"
                peft_model.save_pretrained(saved[step])
        seconds = time.perf_counter() - t0
        peft_model.eval()
        with torch.no_grad():
            final_loss = float(
                torch.nn.functional.cross_entropy(
                    peft_model(input_ids=ctx).logits[:, -1, :].float(), targets
                )
            )
        after = {s: skill_accuracy(peft_model, tokenizer, s) for s in SKILLS}
    finally:
        torch.set_num_threads(threads)

    metrics: dict[str, Any] = {
        "skill": skill,
        "arch": arch,
        "steps": steps,
        "rank": rank,
        "alpha": alpha,
        "lr": lr,
        "loss_initial": losses[0],
        "loss_final": final_loss,
        "accuracy": {s: {"before": before[s], "after": after[s]} for s in SKILLS},
    }
    if saves:
        metrics["checkpoints"] = saves
    out = Path(out)
    with atomic_dir(out) as tmp:
        for folder in saved.values():
            shutil.move(str(folder), tmp / folder.name)
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        peft_model.save_pretrained(tmp)
        baked = _bake_in_memory(base, tmp, saved_dtype)
        for s in SKILLS:
            metrics["accuracy"][s]["after_bake"] = skill_accuracy(baked, tokenizer, s)
        write_json(tmp / "metrics.json", metrics)
        write_provenance(
            tmp,
            step="demo-adapter",
            inputs={"base": base},
            params={k: metrics[k] for k in ("skill", "steps", "rank", "alpha", "lr")},
            source={"generator": "mergebake.demo.train_adapter"},
            seed=seed,
        )
    return {**metrics, "seconds": seconds}


def _saved_dtype(base: Path) -> str:
    cfg = json.loads((Path(base) / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def _bake_in_memory(base: Path, adapter: Path, dtype: str):
    """Base (in its saved ``dtype``) + the saved adapter, merged with PEFT's default
    ``merge_and_unload``: what the bake step writes."""
    from peft import PeftModel

    model, _, _ = load_base(base, dtype=dtype)
    with _quiet_peft():
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence the FutureWarning PEFT 0.21 triggers by calling transformers 5's deprecated
    ``is_gradient_checkpointing``; nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


# --------------------------------------------------------------------------- tasks


def task_name(skill: str) -> str:
    """The lm-eval task name of a skill: ``demo_<skill>``."""
    _skill_words(skill)
    return f"demo_{skill}"


#: The lm-eval group holding every demo task.
GROUP = "demo"


def _task_yaml(skill: str, data_file: Path) -> str:
    # JSON is valid YAML; json.dumps quotes paths and Jinja templates safely.
    q = json.dumps
    return "\n".join(
        [
            f"task: {task_name(skill)}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {q(str(data_file))}",
            "test_split: test",
            "output_type: multiple_choice",
            f"doc_to_text: {q('{{prompt}}')}",
            "doc_to_choice: choices",
            "doc_to_target: answer",
            'target_delimiter: " "',
            "num_fewshot: 0",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def _group_yaml() -> str:
    lines = [f"group: {GROUP}", "task:"]
    lines += [f"  - {task_name(s)}" for s in SKILLS]
    lines += [
        "aggregate_metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    weight_by_size: true",
        "metadata:",
        "  version: 1.0",
        "",
    ]
    return "\n".join(lines)


def write_tasks(out: Path) -> None:
    """Write the lm-eval task folder for the demo skills into ``out``.

    For each skill: ``<skill>.jsonl`` (the :func:`skill_docs`, one JSON object per line)
    and ``demo_<skill>.yaml``, a ``multiple_choice`` task reading it through the ``json``
    dataset builder with an *absolute* ``data_files`` path of its final location (lm-eval
    resolves relative paths against the working directory), scored with ``acc`` and
    ``acc_norm``. Also ``demo.yaml``, the group ``demo`` of all of them, ``tasks.json``
    (``{"group": "demo", "tasks": {task: {"skill", "data_file", "docs"}}}``) and
    ``provenance.json``. Pass ``out`` to lm-eval as ``--include_path`` (or
    ``TaskManager(include_path=out)``). ``out`` appears atomically; since the YAMLs name
    their own location, moving the folder afterwards breaks them: write it where it stays.
    """
    out = Path(out).resolve()
    summary: dict[str, Any] = {"group": GROUP, "tasks": {}}
    with atomic_dir(out) as tmp:
        for skill in SKILLS:
            docs = skill_docs(skill)
            jsonl = f"{skill}.jsonl"
            with open(tmp / jsonl, "w", encoding="utf-8") as fh:
                for d in docs:
                    fh.write(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n")
            (tmp / f"{task_name(skill)}.yaml").write_text(
                _task_yaml(skill, out / jsonl), encoding="utf-8"
            )
            summary["tasks"][task_name(skill)] = {
                "skill": skill,
                "data_file": str(out / jsonl),
                "docs": len(docs),
            }
        (tmp / f"{GROUP}.yaml").write_text(_group_yaml(), encoding="utf-8")
        write_json(tmp / "tasks.json", summary)
        write_provenance(
            tmp,
            step="demo-tasks",
            inputs={},
            params={"skills": list(SKILLS)},
            source={"generator": "mergebake.demo.write_tasks"},
        )


# --------------------------------------------------------------------------- CLI layer


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise MergebakeError(f"threads={threads!r}: must be an integer >= 1")
    _torch().set_num_threads(threads)


def cli_base(
    out: str | Path,
    *,
    arch: str,
    layers: int,
    seed: int,
    dtype: str = "bfloat16",
    threads: int | None = None,
) -> int:
    """``mergebake demo-base``: :func:`make_base` (``layers`` → ``num_layers``), then print a
    one-line JSON summary to stdout. ``threads`` caps torch's CPU threads. Returns 0."""
    _set_threads(threads)
    t0 = time.perf_counter()
    make_base(Path(out), arch=arch, num_layers=layers, seed=seed, dtype=dtype)
    print(
        json.dumps(
            {
                "out": str(out),
                "arch": arch,
                "layers": layers,
                "seed": seed,
                "dtype": dtype,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    )
    return 0


def cli_adapter(
    base: str | Path,
    out: str | Path,
    *,
    skill: str,
    seed: int,
    steps: int = DEFAULT_STEPS,
    rank: int = 8,
    alpha: int = 16,
    lr: float = DEFAULT_LR,
    min_accuracy: float | None = 0.9,
    threads: int | None = None,
    checkpoints: Sequence[int] = (),
) -> int:
    """``mergebake demo-adapter``: :func:`train_adapter`, then print its metrics as JSON.

    ``threads`` caps torch's CPU threads for loading and scoring (training itself always
    runs on one thread, so the weights do not depend on it). When ``min_accuracy`` is set
    and the baked adapter's accuracy on its own skill stays below it, the adapter folder is
    still written but :class:`MergebakeError` is raised, so a demo that would show no signal
    fails loudly. Returns 0.
    """
    _set_threads(threads)
    metrics = train_adapter(
        Path(base),
        Path(out),
        skill=skill,
        seed=seed,
        steps=steps,
        rank=rank,
        alpha=alpha,
        lr=lr,
        checkpoints=checkpoints,
    )
    print(json.dumps(metrics, sort_keys=True))
    got = metrics["accuracy"][skill]["after_bake"]
    if min_accuracy is not None and got < min_accuracy:
        raise MergebakeError(
            f"{out}: adapter reaches only {got:.2f} accuracy on skill {skill!r} (< "
            f"min_accuracy {min_accuracy}); raise steps or lr"
        )
    return 0


def cli_tasks(out: str | Path) -> int:
    """``mergebake demo-tasks``: :func:`write_tasks`, then print the task names as JSON.
    Returns 0."""
    write_tasks(Path(out))
    print(
        json.dumps(
            {
                "out": str(Path(out).resolve()),
                "group": GROUP,
                "tasks": [task_name(s) for s in SKILLS],
            }
        )
    )
    return 0


__all__: Sequence[str] = (
    "SKILLS",
    "SKILL_WORDS",
    "N_PIECES",
    "VOCAB_SIZE",
    "GROUP",
    "skill_docs",
    "tokenizer_corpus",
    "train_sentencepiece",
    "build_tokenizer",
    "make_tokenizer",
    "base_config",
    "make_base",
    "load_base",
    "skill_accuracy",
    "train_adapter",
    "task_name",
    "write_tasks",
    "cli_base",
    "cli_adapter",
    "cli_tasks",
)
