"""Builders of tiny checkpoints (Gemma-3, Llama, Qwen2, GPT-2) and LoRA adapters, made with
the real classes.

Plain functions (not fixtures) so any test module can use them. Every model is a few
hundred kB: vocabulary 64, hidden size 64, two layers; the multimodal Gemma-3 has a
one-layer SigLIP vision tower of 56x56 images. Llama is untied (its own ``lm_head``),
Qwen2 tied with biases on q/k/v, GPT-2 uses ``Conv1D`` (weights stored ``[in, out]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 64
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def text_config(tie: bool = True):
    """The tiny ``Gemma3TextConfig`` shared by every builder."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        sliding_window=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=tie,
    )


def mm_config(tie: bool = True):
    """The tiny ``Gemma3Config``: the text config above plus a one-layer SigLIP tower."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    return Gemma3Config(
        text_config=text_config(tie).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        tie_word_embeddings=tie,
    )


def save_tokenizer(folder: Path) -> None:
    """Write a word-level tokenizer over tokens ``t0``..``t63`` with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(4, VOCAB)}
    vocab.update({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with seeded noise (norm weights too), so no tensor is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _save(model, folder: Path, dtype: torch.dtype, seed: int, **save_kwargs) -> Path:
    _randomise(model, seed)
    model.to(dtype).save_pretrained(folder, **save_kwargs)
    save_tokenizer(folder)
    return folder


def make_gemma3_text(
    folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, tie: bool = True, **save_kwargs
) -> Path:
    """Save a tiny text-only ``Gemma3ForCausalLM`` (keys ``model.*``) to ``folder``.

    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size="100KB"``).
    """
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    return _save(Gemma3ForCausalLM(text_config(tie)), Path(folder), dtype, seed, **save_kwargs)


def make_gemma3_mm(
    folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, tie: bool = True, **save_kwargs
) -> Path:
    """Save a tiny ``Gemma3ForConditionalGeneration`` (transformers 5.x layout) to ``folder``.

    Keys: ``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*`` and,
    only when ``tie`` is false, ``language_model.lm_head.weight``.
    """
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(mm_config(tie))
    return _save(model, Path(folder), dtype, seed, **save_kwargs)


# The tiny decoder shape shared by the Llama and Qwen2 builders.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def make_llama(
    folder: Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tie: bool = False,
    **save_kwargs,
) -> Path:
    """Save a tiny ``LlamaForCausalLM`` (untied head by default) to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**TINY, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(cfg), Path(folder), dtype, seed, **save_kwargs)


def make_qwen2(
    folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, tie: bool = True, **save_kwargs
) -> Path:
    """Save a tiny ``Qwen2ForCausalLM`` (tied head, biases on q/k/v) to ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**TINY, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return _save(Qwen2ForCausalLM(cfg), Path(folder), dtype, seed, **save_kwargs)


def make_gpt2(
    folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **save_kwargs
) -> Path:
    """Save a tiny ``GPT2LMHeadModel`` (``Conv1D`` layers, so LoRA uses fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(cfg), Path(folder), dtype, seed, **save_kwargs)


def load_model(folder: Path):
    """Load a checkpoint with the class its config names, in its stored dtype, on CPU."""
    import transformers

    arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(folder, dtype="auto")


def make_lora(
    base_dir: Path,
    adapter_dir: Path,
    target_modules=("q_proj", "v_proj"),
    r: int = 4,
    alpha: int = 8,
    seed: int = 1,
    **lora_kwargs,
) -> Path:
    """Save a PEFT LoRA adapter for ``base_dir`` with random non-zero A and B.

    A non-zero B makes the bake change the targeted weights; the copies PEFT trains for
    ``modules_to_save`` get noise added, so replacing them is visible too (DoRA magnitudes
    and LoRA biases are random as well). ``target_modules`` may be a list or a string (a
    regex, or ``"all-linear"``). PEFT keeps the LoRA weights in fp32 on a bf16 base
    (``autocast_adapter_dtype``), so the file holds F32 tensors.
    """
    from peft import LoraConfig, get_peft_model

    model = load_model(base_dir)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    peft_model.save_pretrained(adapter_dir)
    return Path(adapter_dir)


def peft_merged(base_dir: Path, adapter_dir: Path):
    """The reference: base + adapter merged by PEFT's default ``merge_and_unload``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_dir), adapter_dir).merge_and_unload()


# ----------------------------------------------------------------------------- families
#
# Tiny checkpoints of every family mergebake normalises, built with transformers 5.x's real
# classes: the text model is 4 layers of hidden 64 (local, global, local, global), the
# towers one layer. ``FAMILIES`` maps a family name to its builder; each builder takes
# ``(folder, dtype, seed)`` and saves with ``save_pretrained`` plus the tiny tokenizer.

_G4_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _tiny(**overrides) -> dict:
    return {**TINY, "num_hidden_layers": 4, "head_dim": 32, **overrides}


def _gemma4_text(**kw):
    from transformers import Gemma4TextConfig

    settings = dict(
        global_head_dim=32,
        sliding_window=16,
        hidden_size_per_layer_input=0,
        layer_types=list(_G4_LAYERS),
    )
    return Gemma4TextConfig(**_tiny(**{**settings, **kw}))


def _gemma4_vision():
    from transformers import Gemma4VisionConfig

    return Gemma4VisionConfig(
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


#: Gemma-4 text settings by style: ``dense`` (12B/31B-style), ``e`` (E2B/E4B-style: per-layer
#: input embeddings, the last two layers kv-shared), ``moe`` (26B-A4B-style expert blocks).
GEMMA4_STYLES = {
    "dense": {},
    "e": dict(
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=2
    ),
    "moe": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
}


def gemma4_config(style: str = "dense"):
    """A tiny ``Gemma4Config``: vision tower always, an audio tower for the E style."""
    from transformers import Gemma4AudioConfig, Gemma4Config

    audio = None
    if style == "e":
        audio = Gemma4AudioConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[8, 4],
            output_proj_dims=32,
        )
    return Gemma4Config(
        text_config=_gemma4_text(**GEMMA4_STYLES[style]),
        vision_config=_gemma4_vision(),
        audio_config=audio,
    )


def add_kv_shared_tensors(folder: Path, seed: int = 5) -> list[str]:
    """Add ``k_proj``/``v_proj``/``k_norm`` tensors for the kv-shared layers of a saved
    Gemma-4 E-style checkpoint, as google/gemma-4-E4B-it ships them (transformers ignores
    them on load: ``_keys_to_ignore_on_load_unexpected``). Returns the names added."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    n, shared = text["num_hidden_layers"], text["num_kv_shared_layers"]
    prefix = "model.language_model." if "text_config" in cfg else "model."
    added = []
    for i in range(n - shared, n):
        donor = f"{prefix}layers.{i - shared}.self_attn."
        for part in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            ref = tensors[donor + part]
            name = f"{prefix}layers.{i}.self_attn.{part}"
            tensors[name] = (torch.randn(ref.shape, generator=g) * 0.05).to(ref.dtype)
            added.append(name)
    save_file(tensors, path, metadata={"format": "pt"})
    return added


def _build(model, folder: Path, dtype, seed) -> Path:
    return _save(model, Path(folder), dtype, seed)


def make_family(folder: Path, family: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Save a tiny checkpoint of ``family`` (a key of :data:`FAMILIES`) to ``folder``."""
    import transformers as T

    torch.manual_seed(seed)
    if family.startswith("gemma4-") and family.removeprefix("gemma4-") in GEMMA4_STYLES:
        model = T.Gemma4ForConditionalGeneration(gemma4_config(family.removeprefix("gemma4-")))
    elif family == "gemma4-text":
        model = T.Gemma4ForCausalLM(_gemma4_text())
    elif family in ("gemma4-unified", "gemma4-unified-text"):
        text = T.Gemma4UnifiedTextConfig(
            **_tiny(global_head_dim=32, sliding_window=16, layer_types=list(_G4_LAYERS))
        )
        if family == "gemma4-unified-text":
            model = T.Gemma4UnifiedForCausalLM(text)
        else:
            vision = T.Gemma4UnifiedVisionConfig(
                patch_size=4,
                pooling_kernel_size=2,
                mm_embed_dim=32,
                mm_posemb_size=16,
                output_proj_dims=64,
            )
            model = T.Gemma4UnifiedForConditionalGeneration(
                T.Gemma4UnifiedConfig(text_config=text, vision_config=vision)
            )
    elif family == "gemma3-mm":
        model = T.Gemma3ForConditionalGeneration(mm_config())
    elif family == "gemma3-text":
        model = T.Gemma3ForCausalLM(text_config())
    elif family in ("mistral3", "mistral-text"):
        text = T.MistralConfig(**_tiny(tie_word_embeddings=False))
        if family == "mistral-text":
            model = T.MistralForCausalLM(text)
        else:
            vision = T.PixtralVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
                head_dim=16,
            )
            model = T.Mistral3ForConditionalGeneration(
                T.Mistral3Config(
                    text_config=text,
                    vision_config=vision,
                    spatial_merge_size=2,
                    tie_word_embeddings=False,
                )
            )
    elif family in ("qwen2-vl", "qwen2_5-vl", "qwen3-vl"):
        rope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        if family == "qwen3-vl":
            text = _tiny(
                tie_word_embeddings=True, rope_parameters={**rope, "mrope_interleaved": True}
            )
            vision.update(
                out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0]
            )
            cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
            model = T.Qwen3VLForConditionalGeneration(cfg)
        elif family == "qwen2_5-vl":
            text = {
                k: v
                for k, v in _tiny(tie_word_embeddings=True, rope_parameters=rope).items()
                if k != "head_dim"
            }
            vision.update(out_hidden_size=64, fullatt_block_indexes=[0])
            cfg = T.Qwen2_5_VLConfig(
                text_config=text, vision_config=vision, tie_word_embeddings=True
            )
            model = T.Qwen2_5_VLForConditionalGeneration(cfg)
        else:
            text = {
                k: v
                for k, v in _tiny(tie_word_embeddings=True, rope_parameters=rope).items()
                if k != "head_dim"
            }
            vision = dict(
                depth=1,
                embed_dim=32,
                hidden_size=64,
                mlp_ratio=2,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
            )
            cfg = T.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
            model = T.Qwen2VLForConditionalGeneration(cfg)
    elif family == "qwen2-text":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**_tiny(tie_word_embeddings=True)))
    elif family == "qwen3-text":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**_tiny(tie_word_embeddings=True)))
    else:
        raise ValueError(f"unknown family {family!r}")
    out = _build(model, folder, dtype, seed)
    if family == "gemma4-e":
        add_kv_shared_tensors(out)
    return out


#: Wrapped (vision-language) families and the text-only causal LM of each family.
WRAPPED_FAMILIES = (
    "gemma3-mm",
    "gemma4-dense",
    "gemma4-e",
    "gemma4-moe",
    "gemma4-unified",
    "mistral3",
    "qwen2-vl",
    "qwen2_5-vl",
    "qwen3-vl",
)
TEXT_FAMILIES = (
    "gemma3-text",
    "gemma4-text",
    "gemma4-unified-text",
    "mistral-text",
    "qwen2-text",
    "qwen3-text",
)
FAMILIES = WRAPPED_FAMILIES + TEXT_FAMILIES
