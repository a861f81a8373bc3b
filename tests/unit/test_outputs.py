"""outputs: a step records its outputs' sha256 and size in provenance.json, and a later
step describing that folder takes the recorded hashes while the size matches and no file
was modified after the record was written."""

from __future__ import annotations

import hashlib
import json
import os
import random

from mergebake import outputs


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _step(folder, files: dict[str, bytes]):
    """A finished step: payload files, then its provenance (which records them)."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return outputs.write_provenance(folder, step="test", inputs={})


def test_provenance_records_each_output_with_size_and_sha256(tmp_path):
    files = {"model.safetensors": b"weights" * 100, "sub/config.json": b"{}"}
    record = _step(tmp_path / "step", files)
    assert record["outputs"] == {
        name: {"bytes": len(data), "sha256": _sha(data)} for name, data in files.items()
    }
    on_disk = json.loads((tmp_path / "step" / "provenance.json").read_text())
    assert on_disk["outputs"] == record["outputs"]
    prov_mtime = (tmp_path / "step" / "provenance.json").stat().st_mtime_ns
    assert outputs.recorded_outputs(tmp_path / "step") == (record["outputs"], prov_mtime)


def test_a_rebuild_with_the_same_bytes_writes_the_same_provenance(tmp_path):
    """No mtimes in the record: an unchanged cell uploads no new provenance.json."""
    files = {"w.bin": b"W" * 100}
    _step(tmp_path / "one", files)
    _step(tmp_path / "two", files)
    one = json.loads((tmp_path / "one" / "provenance.json").read_text())
    two = json.loads((tmp_path / "two" / "provenance.json").read_text())
    assert one["outputs"] == two["outputs"]


def _tamper(folder, name: str, sha: str) -> None:
    """Make the recorded sha256 of ``name`` deliberately wrong (mtimes of payload kept)."""
    prov = folder / "provenance.json"
    record = json.loads(prov.read_text())
    record["outputs"][name]["sha256"] = sha
    prov.write_text(json.dumps(record))


def test_recorded_hash_is_taken_while_size_and_mtime_match_and_recomputed_after(tmp_path):
    step = tmp_path / "step"
    _step(step, {"a.bin": b"A" * 1000, "b.bin": b"B" * 10})
    fake = "f" * 64
    _tamper(step, "a.bin", fake)

    # Size and mtime unchanged: the record is used, the file is not read.
    assert outputs.describe_input(step)["files"] == {"a.bin": fake, "b.bin": _sha(b"B" * 10)}
    assert outputs.file_manifest(step)["a.bin"] == {"bytes": 1000, "sha256": fake}
    # Asked not to reuse: hashed from the bytes.
    assert outputs.file_manifest(step, reuse=False)["a.bin"]["sha256"] == _sha(b"A" * 1000)

    # Same size, modified after the record: hashed again.
    st = (step / "a.bin").stat()
    later = (step / "provenance.json").stat().st_mtime_ns + 1_000_000
    os.utime(step / "a.bin", ns=(st.st_atime_ns, later))
    assert outputs.describe_input(step)["files"]["a.bin"] == _sha(b"A" * 1000)


def test_a_size_change_is_hashed_again_even_with_the_recorded_mtime(tmp_path):
    step = tmp_path / "step"
    _step(step, {"a.bin": b"A" * 1000})
    _tamper(step, "a.bin", "f" * 64)
    st = (step / "a.bin").stat()
    (step / "a.bin").write_bytes(b"A" * 999)
    os.utime(step / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    assert outputs.describe_input(step)["files"]["a.bin"] == _sha(b"A" * 999)


def test_files_the_record_does_not_name_are_hashed(tmp_path):
    step = tmp_path / "step"
    _step(step, {"a.bin": b"A"})
    (step / "late.bin").write_bytes(b"L")  # written after the provenance
    (step / "provenance.json").write_text("{}")  # a record from before outputs were recorded
    assert outputs.describe_input(step)["files"] == {"a.bin": _sha(b"A"), "late.bin": _sha(b"L")}


def test_a_hard_linked_output_takes_its_inputs_recorded_hash(tmp_path):
    """normalise links unchanged files: the output record reuses the input's hash."""
    src = tmp_path / "src"
    _step(src, {"w.bin": b"W" * 100})
    _tamper(src, "w.bin", "e" * 64)  # so reuse is visible
    assert outputs.describe_input(src)["files"]["w.bin"] == "e" * 64
    out = tmp_path / "out"
    out.mkdir()
    os.link(src / "w.bin", out / "w.bin")
    record = outputs.write_provenance(out, step="link", inputs={})
    assert record["outputs"]["w.bin"]["sha256"] == "e" * 64


def _write_out_of_order(path, data: bytes, pieces: list[tuple[int, int]], follow) -> None:
    """Write ``data`` into ``path`` piece by piece in the given order, reporting each."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for start, end in pieces:
            os.pwrite(fd, data[start:end], start)
            follow.written(start, end - start)
    finally:
        os.close(fd)


def test_following_hash_gives_the_file_sha256_for_writes_in_any_order(tmp_path, monkeypatch):
    """Ranges reported out of order, adjacent, empty and overlapping: the digest is the
    file's, and the thread hashed the prefix before finish (small chunks forced)."""
    monkeypatch.setattr(outputs, "_CHUNK", 1000)
    rng = random.Random(0)
    data = bytes(rng.randrange(256) for _ in range(50_000))
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(40))})
    pieces = list(zip(cuts[:-1], cuts[1:], strict=True))
    rng.shuffle(pieces)
    pieces.insert(3, (7000, 7000))  # an empty range
    pieces.append((100, 2000))  # a range reported again
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    os.truncate(path, len(data))
    follow = outputs.FollowingHash(path)
    _write_out_of_order(path, data, pieces, follow)
    assert follow.finish() == _sha(data)
    assert follow._pos == len(data)


def test_following_hash_reads_ranges_nobody_reported_at_finish(tmp_path):
    """A hole nobody reports (or a writer that never says) is still hashed, as on disk."""
    data = os.urandom(3 * 1024 * 1024)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    follow = outputs.FollowingHash(path)
    follow.written(1024, 4096)  # not at the start: nothing can be hashed before finish
    assert follow.finish() == _sha(data)


def test_following_hash_cancel_stops_without_a_result(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    follow = outputs.FollowingHash(path)
    follow.written(0, 5)
    follow.cancel()
    assert not follow._thread.is_alive()


def test_a_remembered_sha256_is_used_until_the_file_changes(tmp_path, monkeypatch):
    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"weights")
    outputs.remember_sha256(folder / "w.bin", "ab" * 32)
    manifest = outputs.output_manifest(folder)
    assert manifest["w.bin"]["sha256"] == "ab" * 32  # taken, not read
    with open(folder / "w.bin", "ab") as fh:  # a later write: new size and mtime
        fh.write(b"!")
    assert outputs.output_manifest(folder)["w.bin"]["sha256"] == _sha(b"weights!")
