"""Checkpoint folders, read without loading them: weight files, shard index, sizes, assets.

A checkpoint is a folder with ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (the layout ``save_pretrained`` writes), plus
``config.json`` and tokenizer files. Single files are read by
:mod:`mergebake.safetensors_io`; this module holds what concerns the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import MergebakeError
from .outputs import link_or_copy
from .safetensors_io import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def weight_files(folder: str | os.PathLike, *, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of the checkpoint in ``folder``, in index order.

    Raises :class:`MergebakeError` when the folder has no safetensors weights (naming the
    pickle files found, which are refused unless ``allow_pickle``), or when the index
    names a shard that is not there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MergebakeError(f"{folder}: checkpoint folder does not exist")
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MergebakeError(
                f"{index}: lists shard(s) {missing} that are not in {folder}; "
                "re-download the checkpoint"
            )
        return [folder / s for s in shards]
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise MergebakeError(
            f"{folder}: only pickle weights {pickles}; mergebake reads safetensors only. "
            "Convert them to safetensors, or set allow_pickle: true in the config"
        )
    if pickles:
        raise MergebakeError(
            f"{folder}: pickle weights {pickles} found; convert them to safetensors "
            "(e.g. load and save_pretrained(safe_serialization=True)) before baking"
        )
    raise MergebakeError(f"{folder}: no *.safetensors weights found")


def tensor_index(folder: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, TensorInfo]:
    """Map every tensor name of the checkpoint in ``folder`` to its :class:`TensorInfo`.

    Raises :class:`MergebakeError` when a tensor appears in two shards, or the index's
    ``weight_map`` disagrees with the shards' headers.
    """
    folder = Path(folder)
    out: dict[str, TensorInfo] = {}
    for f in weight_files(folder, allow_pickle=allow_pickle):
        tensors, _ = read_header(f)
        for name, info in tensors.items():
            if name in out:
                raise MergebakeError(
                    f"{folder}: tensor {name!r} is in both {out[name].file.name} and {f.name}"
                )
            out[name] = info
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise MergebakeError(f"{index}: names tensors not found in any shard: {missing[:5]}")
    return out


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Total size in bytes of the checkpoint's tensors, from the index or the headers."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    return sum(t.nbytes for t in tensor_index(folder).values())


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint folder as a dict; a clear error when absent or broken."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MergebakeError(f"{path}: missing; a checkpoint needs its config.json") from e
    except json.JSONDecodeError as e:
        raise MergebakeError(f"{path}: not valid JSON ({e})") from e


# Files beside the weights that a checkpoint needs to be used: tokenizer, chat template,
# generation defaults. Processor files only make sense next to a multimodal model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)
GENERATION_FILES = ("generation_config.json",)
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def copy_assets(
    src: str | os.PathLike, dst: str | os.PathLike, *, processor: bool, link: bool
) -> list[str]:
    """Copy (or hard-link, where ``link``) tokenizer, chat-template and generation files.

    Returns the relative paths written. ``processor`` also takes the image processor
    configs, which belong beside a multimodal model only.
    """
    src, dst = Path(src), Path(dst)
    names = TOKENIZER_FILES + GENERATION_FILES + (PROCESSOR_FILES if processor else ())
    put = link_or_copy if link else shutil.copy2
    done: list[str] = []
    for name in names:
        if (src / name).is_file():
            put(src / name, dst / name)
            done.append(name)
    for d in TOKENIZER_DIRS:
        if (src / d).is_dir():
            for f in sorted((src / d).rglob("*")):
                if f.is_file():
                    rel = f.relative_to(src)
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    put(f, dst / rel)
                    done.append(rel.as_posix())
    return done
