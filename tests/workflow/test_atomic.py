"""Atomic outputs: a bake and a merge killed with SIGKILL mid-write leave nothing that looks
finished; the rerun cleans up and gives outputs byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _models import make_lora

BIN = Path(sys.executable).parent


def make_big_text(folder: Path, seed: int) -> Path:
    """A Gemma-3 text checkpoint of ~130 MB (bf16), large enough to kill during its write."""
    from _models import save_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("atomic")
    base = make_big_text(d / "base", 0)
    return {
        "base": base,
        "adapter": make_lora(base, d / "adapter"),
        "other": make_big_text(d / "other", 1),
    }


def kill_mid_write(cmd: list[str], out: Path) -> None:
    """Start ``cmd``; SIGKILL it as soon as a weights file appears in its temporary folder."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            tmps = list(out.parent.glob(f".{out.name}.tmp-*"))
            if any(f.stat().st_size > 0 for t in tmps for f in t.glob("*.safetensors")):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                pytest.fail(f"{cmd[1]} finished before it could be killed mid-write")
            time.sleep(0.002)
        pytest.fail("no write started in time")
    finally:
        if proc.poll() is None:
            proc.kill()


def payload(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "provenance.json"
    }


@pytest.mark.parametrize("step", ["bake", "merge"])
def test_kill_mid_write_then_rerun_is_byte_identical(inputs, tmp_path, step):
    def cmd(out: Path) -> list[str]:
        if step == "bake":
            return [
                str(BIN / "mergebake"),
                "bake",
                "--base",
                str(inputs["base"]),
                "--adapter",
                str(inputs["adapter"]),
                "--out",
                str(out),
            ]
        root = Path(__file__).resolve().parents[2]
        return [
            str(BIN / "mergebake"),
            "merge",
            "--recipe",
            str(root / "recipes/ties.yaml"),
            "--base",
            str(inputs["base"]),
            "--model",
            f"eng={inputs['other']}",
            "--model",
            f"nob={inputs['base']}",
            "--out",
            str(out),
            "--seed",
            "3",
        ]

    out, ref = tmp_path / "out", tmp_path / "ref"
    kill_mid_write(cmd(out), out)
    assert not out.exists()  # nothing that looks finished
    assert list(tmp_path.glob(".out.tmp-*"))  # only the killed writer's temporary folder
    subprocess.run(cmd(out), check=True, capture_output=True)
    subprocess.run(cmd(ref), check=True, capture_output=True)
    assert not list(tmp_path.glob(".*.tmp-*"))  # the rerun removed the dead writer's leftovers
    assert payload(out) == payload(ref)
    assert any(name.endswith(".safetensors") for name in payload(out))
