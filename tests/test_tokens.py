import contextlib
import dataclasses
import io
import json
import os
import random
import unittest.mock

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from titok_fast import tokens
from titok_fast.tokens import (
    MAX_INT32,
    METADATA_KEY,
    TokenFile,
    TokenFileError,
    is_complete,
    load_tokens,
    save_tokens,
    try_load_tokens,
)

CODEBOOK = 8575


def make_token_file(counts=(7, 1, 12)) -> TokenFile:
    chunks = [torch.randint(0, CODEBOOK, (n,), dtype=torch.int32) for n in counts]
    chunks[0][0], chunks[-1][-1] = 0, CODEBOOK - 1  # both ends of the range
    return TokenFile.from_chunks(
        chunks,
        grids=[(16, 128, 128)] * len(counts),
        start_times=[2.0 * i + 0.125 for i in range(len(counts))],
        model_config={"patch_size": [4, 8, 8], "fsq_levels": [8, 8, 8, 5, 5, 5], "encoder_size": "small"},
        weights_digest="sha256:0123abcd",
        fps=8.0,
        source="/videos/clip.mp4",
        frames_per_chunk=16,
        tail="pad",
        last_chunk_frames=5,
        codebook_size=CODEBOOK,
        chunk_seconds=2.0,
        source_fps=30000 / 1001,
    )


def read_raw(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}, json.loads(file.metadata()[METADATA_KEY])


def write_raw(path, tensors: dict[str, torch.Tensor], metadata: dict | str) -> None:
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file(tensors, str(path), metadata={METADATA_KEY: text})


def test_round_trip_is_exact(tmp_path):
    original = make_token_file()
    save_tokens(tmp_path / "a.safetensors", original)
    loaded = load_tokens(tmp_path / "a.safetensors")
    for name in ("indices", "token_counts", "grids", "start_times", "offsets"):
        assert getattr(loaded, name).dtype == getattr(original, name).dtype, name
        assert torch.equal(getattr(loaded, name), getattr(original, name)), name
    for name in (
        "model_config",
        "weights_digest",
        "fps",
        "source",
        "frames_per_chunk",
        "tail",
        "last_chunk_frames",
        "sampling",
        "weights_source",
        "chunk_seconds",
        "source_fps",
    ):
        assert getattr(loaded, name) == getattr(original, name), name
    assert loaded.codebook_size == CODEBOOK
    assert loaded.offsets.tolist() == [0, 7, 8, 20]
    for i, chunk in enumerate(loaded.all_indices()):
        assert chunk.dtype == torch.int64
        assert torch.equal(chunk, loaded.clip_indices(i))
        assert torch.equal(chunk, original.clip_indices(i))
    raw, metadata = read_raw(tmp_path / "a.safetensors")
    assert {name: t.dtype for name, t in raw.items()} == {
        "indices": torch.int16,
        "token_counts": torch.int32,
        "grids": torch.int32,
        "offsets": torch.int64,
        "start_times": torch.float64,
    }
    assert metadata["version"] == 1
    assert metadata["chunking"] == {
        "frames_per_chunk": 16,
        "tail": "pad",
        "last_chunk_frames": 5,
        "sampling": "upstream",
        "chunk_seconds": 2.0,
        "source_fps": 30000 / 1001,
    }


def test_from_chunks_keeps_each_chunk():
    chunks = [torch.tensor([5, 0, 8574]), torch.tensor([[1, 2], [3, 4]])]
    token_file = TokenFile.from_chunks(
        chunks,
        [(4, 16, 16), (4, 32, 32)],
        [0.0, 0.5],
        model_config={},
        weights_digest="",
        fps=8,
        source="x",
        frames_per_chunk=4,
        tail="drop",
        last_chunk_frames=4,
        codebook_size=CODEBOOK,
    )
    assert token_file.token_counts.tolist() == [3, 4]
    assert token_file.clip_indices(1).tolist() == [1, 2, 3, 4]
    assert token_file.grids.tolist() == [[4, 16, 16], [4, 32, 32]]
    with pytest.raises(IndexError, match="chunk 2 out of range for 2 chunks"):
        token_file.clip_indices(2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"codebook_size": 40000}, "to fit int16"),
        ({"chunk": torch.tensor([CODEBOOK])}, r"indices must lie in \[0, 8575\)"),
        ({"chunk": torch.tensor([-1])}, r"indices must lie in \[0, 8575\)"),
        ({"chunk": torch.tensor([65536 + 5])}, r"indices must lie in \[0, 8575\)"),  # 5 once narrowed to int16
        ({"tail": "wrap"}, "tail must be one of"),
        ({"last_chunk_frames": 17}, "last_chunk_frames must be in"),
        ({"last_chunk_frames": 0}, "last_chunk_frames must be in"),  # (a last chunk of no frames: its tokens lost)
        ({"fps": "8"}, "field 'fps' must be int or float"),
        ({"grid": (0, 16, 16)}, "grids must be positive"),
        ({"fps": 0.0}, r"fps must be in \(0, 1000\]; got 0.0"),
        ({"fps": float("inf")}, r"fps must be in \(0, 1000\]; got inf"),
        ({"fps": float("nan")}, r"fps must be in \(0, 1000\]; got nan"),
        ({"fps": 1e30}, r"fps must be in \(0, 1000\]; got 1e\+30"),
        ({"fps": 10**400}, r"fps must be in \(0, 1000\]; got 100000000000000000\.\.\.0000000000000000000$"),
        ({"chunks": 0}, "a token file holds at least one chunk; got 0"),
        ({"grid": (4, 16, 16)}, r"chunk 0 has grid \[4, 16, 16\]; every chunk's T must be frames_per_chunk = 16"),
        ({"frames_per_chunk": 1 << 63}, r"frames_per_chunk must be in \[1, 2147483647\]; got 92233"),
        ({"frames_per_chunk": 0}, r"frames_per_chunk must be in \[1, 2147483647\]; got 0"),
        ({"sampling": "../x"}, r"sampling must be one of \('upstream', 'time'\); got '../x'"),
        ({"times": [0.0, float("nan")]}, r"start_times must be finite, >= 0 and non-decreasing; got \[0.0, nan\]"),
        ({"times": [-0.5, 1.0]}, "start_times must be finite, >= 0 and non-decreasing"),
        ({"times": [2.0, 1.0]}, r"start_times must be finite, >= 0 and non-decreasing; got \[2.0, 1.0\]"),
        ({"chunk": torch.tensor([1.9, 2.0])}, r"chunk 0's indices must be integers; got dtype torch.float32"),
        ({"chunk": [1, 2]}, r"chunk 0's indices must be a torch tensor; got list"),
        ({"grid": (16, 16.5, 16)}, r"chunk 0's grid must be three integers \(T, H, W\); got \(16, 16.5, 16\)"),
        ({"grid": (16, 1 << 40, 16)}, r"chunk 0's grid must be three integers"),
        ({"grid": (16, 16)}, r"chunk 0's grid must be three integers"),
        ({"chunk_seconds": 0.0}, r"chunk_seconds must be finite and > 0; got 0.0"),
        ({"chunk_seconds": -2}, r"chunk_seconds must be finite and > 0; got -2"),
        ({"chunk_seconds": float("nan")}, r"chunk_seconds must be finite and > 0; got nan"),
        ({"chunk_seconds": float("inf")}, r"chunk_seconds must be finite and > 0; got inf"),
        ({"chunk_seconds": "2.5"}, r"field 'chunk_seconds' must be int or float"),
        ({"source_fps": 0.0}, r"source_fps must be finite and > 0; got 0.0"),
        ({"source_fps": float("inf")}, r"source_fps must be finite and > 0; got inf"),
        ({"source_fps": "30"}, r"field 'source_fps' must be int or float"),
        ({"model_config": {"levels": torch.ones(2)}}, r"^model_config must hold only JSON values \(finite numbers\); "
                                                      r"Object of type Tensor is not JSON serializable$"),
        ({"model_config": {"scale": float("nan")}}, r"^model_config must hold only JSON values \(finite numbers\)"),
        ({"grid": (16, 8200, 16)}, r"^chunk 0 has grid \[16, 8200, 16\]; a clip is at most \[4096, 8192, 8192\] \(T, "
                                   r"H, W\) and 33,554,432 pixels in all$"),
        ({"grid": (16, 2048, 2048)}, r"^chunk 0 has grid \[16, 2048, 2048\]; a clip is at most"),
        ({"grid": (MAX_INT32, 64, 64), "frames_per_chunk": MAX_INT32, "last_chunk_frames": 1},  # (source_frames: 16
         r"^chunk 0 has grid \[2147483647, 64, 64\]; a clip is at most"),  # GiB for this one chunk)
        ({"grid": (4096, 16, 16), "frames_per_chunk": 4096, "chunks": 4097},
         r"^4,097 chunks of 4096 frames; a token file holds at most 262,144 chunks and 16,777,216 frames in all$"),
        ({"chunks": (1 << 18) + 1}, r"^262,145 chunks; a token file holds at most 262,144$"),
    ],
    ids=[
        "codebook-too-big", "index-too-big", "index-negative", "index-wraps-in-int16", "tail", "last-chunk-frames",
        "last-chunk-frames-zero", "fps-type", "grid",
        "fps-zero", "fps-inf", "fps-nan", "fps-huge", "fps-400-digits", "no-chunks", "grid-frames", "frames-huge",
        "frames-zero",
        "sampling", "times-nan", "times-negative", "times-decreasing", "index-float", "index-list", "grid-float",
        "grid-huge",
        "grid-short", "chunk-seconds-zero", "chunk-seconds-negative", "chunk-seconds-nan", "chunk-seconds-inf",
        "chunk-seconds-text", "source-fps-zero", "source-fps-inf", "source-fps-text", "config-tensor", "config-nan",
        "grid-past-max", "grid-voxels", "grid-frames-past-max", "too-many-frames", "too-many-chunks",
    ],
)  # fmt: skip
def test_invalid_token_file_is_refused(change, message):
    chunk, grid = change.pop("chunk", torch.tensor([1, 2])), change.pop("grid", (16, 16, 16))
    times = change.pop("times", [0.0] * change.pop("chunks", 1))
    settings = dict(model_config={}, weights_digest="", fps=8.0, source="x", frames_per_chunk=16, tail="pad")
    settings.update(last_chunk_frames=3, codebook_size=CODEBOOK)
    with pytest.raises(TokenFileError, match=message):
        TokenFile.from_chunks([chunk] * len(times), [grid] * len(times), times, **{**settings, **change})


def test_each_chunk_of_all_indices_holds_its_own_indices_and_bytes_load_from_any_buffer(tmp_path):
    """all_indices() gave views of one tensor of the whole file's indices: a DataLoader worker returning one chunk
    sent all of them. load_tokens(data=) took only bytes, and called a bytearray's valid file unreadable."""
    token_file = make_token_file(counts=(7, 1, 12))
    chunks = token_file.all_indices()
    assert [c.untyped_storage().nbytes() for c in chunks] == [8 * 7, 8 * 1, 8 * 12]
    assert torch.equal(torch.cat(chunks), token_file.indices.long())
    save_tokens(tmp_path / "a.safetensors", token_file)
    raw = (tmp_path / "a.safetensors").read_bytes()
    for data in (bytearray(raw), memoryview(raw)):
        assert torch.equal(load_tokens("key", data=data).indices, token_file.indices)
    with pytest.raises(TypeError, match="^key: data must be a token file's bytes; got str$"):
        load_tokens("key", data="str")


def test_errors_about_a_long_file_show_a_few_of_its_values(tmp_path):
    """A stranger's file may hold millions of chunks: an error names the chunk at fault, never lists them all."""
    token_file = TokenFile.from_chunks(
        [torch.tensor([1])] * 100_000, [(4, 16, 16)] * 100_000, [0.0] * 100_000, model_config={}, weights_digest="",
        fps=8.0, source="x", frames_per_chunk=4, tail="drop", last_chunk_frames=4, codebook_size=CODEBOOK,
    )  # fmt: skip
    path = tmp_path / "long.safetensors"
    save_tokens(path, token_file)
    tensors, metadata = read_raw(path)
    tensors["grids"][70_000, 0] = 8
    tensors["start_times"][1:] = -1.0
    write_raw(path, tensors, metadata)
    with pytest.raises(TokenFileError, match=r"chunk 70000 has grid \[8, 16, 16\]") as refused:
        load_tokens(path)
    assert len(str(refused.value)) < 300
    tensors["grids"][70_000, 0] = 4
    write_raw(path, tensors, metadata)
    with pytest.raises(TokenFileError, match=r"got \[0.0, -1.0, -1.0, -1.0, -1.0, -1.0, \.\.\.\]$"):
        load_tokens(path)
    tensors["start_times"][1:] = 1.0
    tensors["offsets"][5] += 1
    write_raw(path, tensors, metadata)
    with pytest.raises(TokenFileError, match=r"offsets disagree with token_counts at chunk 4: 2 against 1$"):
        load_tokens(path)
    for indices in (token_file.indices[:-1], torch.cat([token_file.indices, token_file.indices[:1]])):  # one short,
        with pytest.raises(TokenFileError, match=rf"token_counts sum to 100000, indices has {len(indices)}$"):  # over
            save_tokens(path, dataclasses.replace(token_file, indices=indices))


def test_the_highest_fps_is_accepted(tmp_path):
    token_file = TokenFile.from_chunks(
        [torch.tensor([1, 2])], [(4, 16, 16)], [0.0], model_config={}, weights_digest="", fps=1000.0, source="x",
        frames_per_chunk=4, tail="drop", last_chunk_frames=4, codebook_size=CODEBOOK,
    )  # fmt: skip
    save_tokens(tmp_path / "a.safetensors", token_file)
    assert load_tokens(tmp_path / "a.safetensors").fps == 1000.0


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_tokens(path, make_token_file())
    save_tokens(path, make_token_file(counts=(3,)))  # overwrites in place
    assert os.listdir(tmp_path) == ["a.safetensors"]
    assert load_tokens(path).token_counts.tolist() == [3]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_tokens(path, make_token_file())
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary left behind, old file intact
    assert load_tokens(path).token_counts.tolist() == [3]


def test_a_write_failing_midway_leaves_the_file_there_and_syncs_in_order(tmp_path, monkeypatch):
    """An error while a token file is written (a full disk) leaves the complete one under its name, and no
    temporary; a write that succeeds syncs the temporary, renames it, then syncs the folder (so that a file the
    manifest calls done is whole after a power cut)."""
    from titok_fast.files import write_atomically

    path = tmp_path / "a.safetensors"
    path.write_bytes(b"x" * 4000)
    with pytest.raises(OSError, match="disk full"), write_atomically_failing(tmp_path):
        write_atomically(path, b"y" * 4000)
    assert os.listdir(tmp_path) == ["a.safetensors"] and path.read_bytes() == b"x" * 4000
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))) or
                        fsync(fd))  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", b)) or replace(a, b))
    write_atomically(path, b"z")
    assert calls == [("fsync", False), ("replace", str(path)), ("fsync", True)] and path.read_bytes() == b"z"


@contextlib.contextmanager
def write_atomically_failing(folder):
    """Writes into ``folder``'s temporaries fail after 100 bytes with ENOSPC's message."""
    real_open = open

    class Failing(io.FileIO):
        def write(self, data):
            super().write(data[:100])
            raise OSError("disk full")

    def opening(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).startswith(str(folder)) and str(file).endswith(".tmp"):
            return Failing(file, "w")
        return real_open(file, mode, *args, **kwargs)

    with unittest.mock.patch("builtins.open", opening):
        yield


def test_start_times_of_a_long_video_load_as_saved():
    """Start times are float64 throughout: an hour of 29.97 fps chunks keeps its last start to the bit (float32
    would move it by about 1e-4 s)."""
    times = [k * 74 * 1001 / 30000 for k in range(1460)]
    token_file = TokenFile.from_chunks(
        [torch.tensor([1])] * 1460, [(20, 16, 16)] * 1460, times, model_config={}, weights_digest="", fps=8.0,
        source="x", frames_per_chunk=20, tail="drop", last_chunk_frames=20, codebook_size=CODEBOOK,
    )  # fmt: skip
    assert token_file.start_times.dtype == torch.float64 and token_file.start_times.tolist() == times


def truncate(keep):
    def tamper(path):
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])

    return tamper


def rewrite(change_tensors=None, change_metadata=None):
    """A tampering that loads the raw file, changes tensors and/or metadata, and writes it back."""

    def tamper(path):
        tensors, metadata = read_raw(path)
        if change_tensors:
            change_tensors(tensors)
        write_raw(path, tensors, change_metadata(metadata) if change_metadata else metadata)

    return tamper


def set_item(name, index, value):
    def change(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][index] = value

    return change


def without(key, section=None):
    def change(metadata):
        del (metadata[section] if section else metadata)[key]
        return metadata

    return change


DAMAGED = r": damaged: what it holds does not match the digest it records \(changed since it was written\)$"
TAMPERINGS = {
    "truncated-header": (truncate(lambda n: 20), r"cut short: 20 bytes, where its header says \d+$"),
    "truncated-data": (truncate(lambda n: n - 4), r"cut short: (\d+) bytes, where its header says (?!\1$)\d+$"),
    "garbage": (lambda p: p.write_bytes(b"\x00\x01garbage" * 10), "not a readable safetensors file"),
    "empty": (lambda p: p.write_bytes(b""), r"not a readable safetensors file \(empty, where a token file begins"),
    "seven-bytes": (truncate(lambda n: 7), r"not a readable safetensors file \(7 bytes, where a token file begins"),
    "bytes-past-its-end": (
        lambda p: p.write_bytes(p.read_bytes() + bytes(10)),
        r": (\d+) bytes, where its header says (?!\1)\d+: bytes past its end \(overwritten in place",
    ),
    "missing-tensor": (rewrite(lambda t: t.pop("offsets")), r"missing tensors \['offsets'\]"),
    "wrong-dtype": (
        rewrite(lambda t: t.update(indices=t["indices"].int())),
        "tensor 'indices' must be 1-d torch.int16; got torch.int32",
    ),
    "wrong-rank": (
        rewrite(lambda t: t.update(grids=t["grids"].flatten())),
        "tensor 'grids' must be 2-d torch.int32",
    ),
    "offsets-not-from-0": (rewrite(set_item("offsets", 0, 1)), "offsets must start at 0"),
    "offsets-decreasing": (rewrite(set_item("offsets", 1, 9)), "offsets must be non-decreasing"),
    "offsets-wrong-end": (rewrite(set_item("offsets", -1, 19)), r"offsets must end at len\(indices\) = 20"),
    "offsets-vs-counts": (rewrite(set_item("token_counts", 0, 6)), "disagree with token_counts"),
    "offsets-length": (
        rewrite(lambda t: t.update(offsets=t["offsets"][:-1])),
        "offsets has 3 entries; expected chunks . 1 = 4",
    ),
    "index-out-of-range": (rewrite(set_item("indices", 3, CODEBOOK)), r"indices must lie in \[0, 8575\)"),
    "grid-zero": (rewrite(set_item("grids", (1, 2), 0)), "grids must be positive"),
    "no-metadata": (
        lambda p: save_file(read_raw(p)[0], str(p), metadata={"other": "1"}),
        "metadata has no 'titok_fast' key",
    ),
    "bad-json": (lambda p: write_raw(p, read_raw(p)[0], "{not json"), "is not valid JSON"),
    "json-not-object": (lambda p: write_raw(p, read_raw(p)[0], "[1, 2]"), "must be a JSON object"),
    "missing-field": (rewrite(change_metadata=without("weights_digest")), "missing field 'weights_digest'"),
    "missing-chunking-field": (
        rewrite(change_metadata=without("tail", "chunking")),
        "metadata chunking is missing field 'tail'",
    ),
    "wrong-field-type": (
        rewrite(change_metadata=lambda m: {**m, "codebook_size": "8575"}),
        "field 'codebook_size' must be int",
    ),
    "wrong-version": (
        rewrite(change_metadata=lambda m: {"version": 2}),
        r"unsupported format version 2 \(supported: 1\)",
    ),
    # what a stranger's file may hold: nothing in it may escape as another exception or exhaust memory
    "fps-infinity": (rewrite(change_metadata=lambda m: {**m, "fps": float("inf")}), "fps must be in"),
    "fps-nan": (rewrite(change_metadata=lambda m: {**m, "fps": float("nan")}), "fps must be in"),
    "fps-huge": (rewrite(change_metadata=lambda m: {**m, "fps": 1e30}), "fps must be in"),
    "no-chunks": (
        rewrite(lambda t: t.update({name: t[name][:1] if name == "offsets" else t[name][:0] for name in t})),
        "at least one chunk; got 0",
    ),
    "json-nested-deeply": (
        lambda p: write_raw(p, read_raw(p)[0], "[" * 100_000 + "]" * 100_000),
        "not valid JSON .nested too deeply.",
    ),
    "json-huge-integer": (
        rewrite(change_metadata=lambda m: json.dumps(m).replace('"version": 1', '"version": ' + "1" * 5000)),
        "is not valid JSON",
    ),
    "metadata-too-long": (
        rewrite(change_metadata=lambda m: {**m, "padding": "x" * (1 << 20)}),
        "characters; at most 1048576",
    ),
    "extra-tensor-of-a-dtype-the-reader-lacks": (  # safetensors' Rust side reads F8_E8M0; its torch table has none
        rewrite(lambda t: t.update(extra=torch.zeros(2, dtype=torch.float8_e8m0fnu))),
        "not a readable safetensors file .KeyError: 'F8_E8M0'.",
    ),
    "header-too-large": (  # 1M tensors of no data: a 40 MB header, refused before it is parsed
        rewrite(lambda t: t.update({f"empty{i}": torch.zeros(0) for i in range(100_000)})),
        r"not a readable safetensors file .its header is \d+ bytes; a token file's is at most 4194304.",
    ),
    # values every check accepts, changed since the file was written: only its digest tells
    "a-token-now-another": (rewrite(set_item("indices", 0, 1)), DAMAGED),  # (0 at first: make_token_file)
    "a-start-time-now-another": (rewrite(lambda t: t.update(start_times=t["start_times"] * 0.5)), DAMAGED),
    "a-metadata-value-now-another": (rewrite(change_metadata=lambda m: {**m, "fps": 4.0}), DAMAGED),
    "the-digest-now-another": (rewrite(change_metadata=lambda m: {**m, "digest": "sha256:" + "0" * 64}), DAMAGED),
    "the-digest-not-a-string": (rewrite(change_metadata=lambda m: {**m, "digest": 7}), "field 'digest' must be str"),
}


@pytest.mark.parametrize("tampering", TAMPERINGS, ids=list(TAMPERINGS))
def test_tampered_file_is_refused(tmp_path, tampering):
    tamper, message = TAMPERINGS[tampering]
    path = tmp_path / "a.safetensors"
    save_tokens(path, make_token_file())
    tamper(path)
    with pytest.raises(TokenFileError, match=message) as info:
        load_tokens(path)
    assert str(path) in str(info.value)
    assert not is_complete(path)


def test_a_check_broken_by_values_it_did_not_foresee_fails_the_file_alone(tmp_path, monkeypatch):
    """A stranger's values that break a check in a way no check foresees (as a frames_per_chunk too large to
    compare with int32 grids once did: OverflowError) still make a TokenFileError naming the file, which a run
    fails alone, never another exception that would stop the run."""
    path = tmp_path / "a.safetensors"
    save_tokens(path, make_token_file())

    def broken(tensors):
        raise OverflowError("int too big to convert")

    monkeypatch.setattr(tokens, "_check_tensors", broken)
    with pytest.raises(TokenFileError, match=r"a.safetensors: not a valid token file \(OverflowError: int too big"):
        load_tokens(path)
    assert try_load_tokens(path) is None


def test_a_deeply_nested_metadata_makes_try_load_tokens_give_none(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"indices": torch.zeros(1, dtype=torch.int16)}, str(path), metadata={METADATA_KEY: "[" * 100_000})
    assert try_load_tokens(path) is None


def test_a_file_larger_than_a_token_file_may_be_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Token files are read whole (a resumed job reads every one): a stranger's file of any size must not be."""
    path = tmp_path / "a.safetensors"
    save_tokens(path, make_token_file())
    size = path.stat().st_size
    monkeypatch.setattr("titok_fast.tokens.MAX_FILE_BYTES", size - 1)
    with pytest.raises(TokenFileError, match=rf"a.safetensors: .*{size} bytes; a token file holds at most {size - 1}"):
        load_tokens(path)
    assert try_load_tokens(path) is None
    monkeypatch.setattr("titok_fast.tokens.MAX_FILE_BYTES", size)
    assert load_tokens(path).token_counts.tolist() == [7, 1, 12]


def test_a_named_pipe_or_a_folder_is_refused_without_waiting(tmp_path):
    """Opening a named pipe for reading waits for a writer: a token file path that names one must not."""
    os.mkfifo(tmp_path / "pipe.safetensors")
    for path in (tmp_path / "pipe.safetensors", tmp_path):
        with pytest.raises(TokenFileError, match=r"not a readable safetensors file \(not a regular file\)"):
            load_tokens(path)


def test_metadata_too_long_to_load_is_not_written(tmp_path):
    token_file = make_token_file()
    object.__setattr__(token_file, "source", "x" * (1 << 20))  # a path no file system has
    with pytest.raises(TokenFileError, match="characters; at most 1048576"):
        save_tokens(tmp_path / "a.safetensors", token_file)
    assert os.listdir(tmp_path) == []


def test_is_complete(tmp_path):
    path = tmp_path / "a.safetensors"
    assert not is_complete(path)
    assert not is_complete(tmp_path)
    save_tokens(path, make_token_file())
    assert is_complete(path)
    assert is_complete(path, weights_digest="sha256:0123abcd")
    assert not is_complete(path, weights_digest="sha256:ffff")
    with pytest.raises(TokenFileError, match="a.safetensors.*not a readable"):
        load_tokens(tmp_path / "missing" / "a.safetensors")


FIXTURE = os.path.join(os.path.dirname(__file__), "data", "tokens_format1.safetensors")


def test_the_digest_does_not_depend_on_how_the_file_lays_its_parts_out(tmp_path):
    """What the digest covers is the tensors' values and the metadata's: a file rewritten with its metadata JSON
    spaced otherwise and its fields in another order (as another tool may write it) still loads; one without a
    digest (written before digests were) loads too."""
    path = tmp_path / "a.safetensors"
    original = make_token_file()
    save_tokens(path, original)
    tensors, metadata = read_raw(path)
    assert metadata["digest"].startswith("sha256:") and len(metadata["digest"]) == 7 + 64
    write_raw(path, dict(reversed(tensors.items())), json.dumps(dict(reversed(metadata.items())), indent=3))
    assert torch.equal(load_tokens(path).indices, original.indices)
    del metadata["digest"]
    write_raw(path, tensors, metadata)
    assert torch.equal(load_tokens(path).indices, original.indices)


def test_a_model_config_with_keys_that_are_not_strings_saves_and_loads(tmp_path):
    """JSON makes every key a string: the digest is taken of the metadata as a reader sees it, so keys that sort
    otherwise as numbers (9 before 10), or cannot be sorted together (1 and "b"), neither break the save nor make
    the file look damaged."""
    path = tmp_path / "a.safetensors"
    config = {"m": {9: "a", 10: "b"}, "mixed": {1: "a", "b": 2, None: 3}, 2.0: [1, 2]}
    save_tokens(path, dataclasses.replace(make_token_file(), model_config=config))
    assert load_tokens(path).model_config == {"m": {"9": "a", "10": "b"}, "mixed": {"1": "a", "b": 2, "null": 3},
                                              "2.0": [1, 2]}  # fmt: skip


def test_a_committed_file_of_format_version_1_still_loads():
    """tests/data/tokens_format1.safetensors was written by save_tokens before the Hub metadata existed."""
    token_file = load_tokens(FIXTURE)
    assert token_file.token_counts.tolist() == [8, 8] and token_file.grids.tolist() == [[4, 32, 32]] * 2
    assert token_file.indices.tolist()[:4] == [236, 423, 2362, 3042]
    assert token_file.weights_digest == "random-seed0-e7b49227e2251f36" and token_file.weights_source == ""
    assert (token_file.tail, token_file.last_chunk_frames, token_file.sampling) == ("pad", 2, "upstream")
    assert token_file.model_config["tokenizer"]["model"]["encoder_size"] == "tiny_thin"
    assert token_file.chunk_seconds is None and token_file.source_fps is None  # (recorded since: files without them
    with pytest.raises(ValueError, match="does not record its source's frame rate"):  # load)
        token_file.source_frames()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    save_tokens(tmp_path / "t.safetensors", make_token_file())
    before = (tmp_path / "t.safetensors").read_bytes()

    def refuse(*args):
        raise OSError("disk full")

    monkeypatch.setattr("titok_fast.files.os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        save_tokens(tmp_path / "t.safetensors", make_token_file((3,)))
    assert (tmp_path / "t.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_an_interrupt_waits_for_the_end_of_the_held_block_it_came_in():
    """What the command's Ctrl-C / SIGTERM handlers hand to ``interrupt``: raised at once outside a held block,
    at the end of the outermost one inside (after the token file and its manifest line), a second one dropped."""
    from titok_fast.files import interrupt, interrupts_held

    written = []
    with pytest.raises(KeyboardInterrupt, match="first"):
        with interrupts_held():
            interrupt(KeyboardInterrupt("first"))
            with interrupts_held():
                interrupt(KeyboardInterrupt("second"))
                written.append("token file")
            written.append("manifest line")
    assert written == ["token file", "manifest line"]
    with pytest.raises(KeyboardInterrupt, match="now"):
        interrupt(KeyboardInterrupt("now"))
    with interrupts_held():  # nothing pending is left behind
        written.append("next")


WEIRD_VALUES = [0, -1, 1, 2**31, 2**63, 10**30, 1e308, float("nan"), float("inf"), "", "x", "../../etc/passwd", None,
                True, [], {}, [1, 2], {"a": 1}, 0.5, "time", "pad", 16]  # fmt: skip


def _mutated(rng: random.Random, tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """A token file with one to three fields or tensors changed as a stranger's file might have them."""
    tensors, metadata = dict(tensors), json.loads(json.dumps(metadata))
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            chunking = metadata.get("chunking")
            where = chunking if rng.random() < 0.3 and isinstance(chunking, dict) and chunking else metadata
            where[rng.choice(sorted(where))] = rng.choice(WEIRD_VALUES)
            continue
        name = rng.choice(sorted(tensors))
        tensor, how = tensors[name].clone(), rng.random()
        if how < 0.3 and tensor.numel():
            value = rng.choice([-1, 0, 1, CODEBOOK, 2**15 - 1, -(2**15)] if not tensor.is_floating_point() else
                               [-1.0, float("nan"), float("inf"), 1e30])  # fmt: skip
            tensor.view(-1)[rng.randrange(tensor.numel())] = value
        elif how < 0.5:
            tensor = tensor[: rng.randrange(tensor.shape[0] + 1)]
        elif how < 0.7:
            tensor = tensor.to(rng.choice([torch.int16, torch.int32, torch.int64, torch.float32, torch.float64]))
        elif how < 0.85:
            tensor = tensor.reshape(-1) if tensor.ndim > 1 else tensor.reshape(-1, 1)
        else:
            tensor = torch.cat([tensor, tensor])
        tensors[name] = tensor
    return save(tensors, metadata={METADATA_KEY: json.dumps(metadata)})


def test_a_strangers_token_file_is_loaded_or_refused_by_a_check_that_names_its_problem(tmp_path):
    """Fields and tensors changed as a stranger's (or a corrupted) file may have them, 1500 files from a fixed seed:
    each loads (its indices readable) or is refused by a check foreseen for it, never by the catch-all for what no
    check foresaw (a frames_per_chunk past int32 once stopped a whole run with an OverflowError)."""
    save_tokens(tmp_path / "a.safetensors", make_token_file())
    tensors, metadata = read_raw(tmp_path / "a.safetensors")
    rng, refused = random.Random(0), 0
    for _ in range(1500):
        data = _mutated(rng, tensors, metadata)
        try:
            loaded = load_tokens("f.safetensors", data)
        except TokenFileError as e:
            assert "not a valid token file (" not in str(e), str(e)
            refused += 1
            continue
        assert sum(len(i) for i in loaded.all_indices()) == loaded.indices.numel()
    assert 1000 < refused < 1500  # (both outcomes are exercised)


def test_a_token_file_too_large_to_load_is_never_written(tmp_path, monkeypatch):
    """Loading refuses a file past MAX_FILE_BYTES, so writing one made a file that could never be read (a resume
    redid it on every run); a video of more clips than that holds fails instead (tests/test_pipeline.py)."""
    from titok_fast import tokens

    token_file = make_token_file(counts=(1000, 1000))
    save_tokens(tmp_path / "fits.safetensors", token_file)
    size = (tmp_path / "fits.safetensors").stat().st_size
    monkeypatch.setattr(tokens, "MAX_FILE_BYTES", size - 1)
    with pytest.raises(TokenFileError, match=f"^would be {size:,} bytes; a token file may have at most {size - 1:,}$"):
        save_tokens(tmp_path / "over.safetensors", token_file)
    assert not (tmp_path / "over.safetensors").exists()


def test_the_most_chunks_a_token_file_holds_is_said_as_it_is():
    """The README and the docstring give the largest video a token file of 256 tokens a clip holds."""
    from pathlib import Path

    most = tokens.most_chunks(256, 20)
    hours = most * 20 / 8 / 3600  # clips of 20 frames at 8 fps
    said = f"{most:,} of 256 tokens, {hours:.0f} hours of 20 frames at"
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert said in readme and f"256 tokens: {most:,} chunks, {hours:.0f} hours" in tokens.most_chunks.__doc__


def test_a_file_of_another_kind_is_refused_without_its_bytes_in_the_message(tmp_path):
    """A link to /etc/passwd named like a token file: its first 8 bytes read as a header length were said in the
    error ("its header is 3475222254926655346 bytes": "root:x:0")."""
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(TokenFileError) as refused:
        load_tokens(path)
    said = str(refused.value)
    assert "do not give the length of a header within the file" in said
    assert str(int.from_bytes(b"root:x:0", "little")) not in said


def test_a_digest_an_earlier_version_wrote_still_matches(tmp_path):
    """The digest's recipe is part of the format: files on disk carry the digest the version that wrote them worked
    out, so a change to what it covers or how (field order, JSON spacing, the tensors' names and shapes) would make
    every file written before look damaged, and a resume redo them all. This file's metadata and digest are as
    save_tokens wrote them (the fixture above predates digests)."""
    path = tmp_path / "a.safetensors"
    tensors = {
        "indices": torch.tensor([0, 5, 8574], dtype=torch.int16),
        "token_counts": torch.tensor([2, 1], dtype=torch.int32),
        "grids": torch.tensor([[4, 16, 16]] * 2, dtype=torch.int32),
        "offsets": torch.tensor([0, 2, 3]),
        "start_times": torch.tensor([0.0, 0.5], dtype=torch.float64),
    }
    metadata = {
        "version": 1, "model_config": {"patch_size": [4, 8, 8], "fsq_levels": [7, 7, 7, 5, 5]},
        "weights_digest": "random-seed0-e7b49227e2251f36", "fps": 8.0, "source": "/videos/clip.mp4",
        "chunking": {"frames_per_chunk": 4, "tail": "pad", "last_chunk_frames": 2, "sampling": "upstream",
                     "chunk_seconds": 0.5, "source_fps": 30.0},
        "codebook_size": 8575, "weights_source": "", "made_with": {"decoder": "pyav"},
        "digest": "sha256:2534e3c13b7ed21ad2c4d7f8bcfa6ffa6c4716ffdc15e1bf3c0f7f53240bab0f",
    }  # fmt: skip
    write_raw(path, tensors, metadata)
    assert load_tokens(path).clip_indices(1).tolist() == [8574]


def test_the_largest_codebook_int16_holds_round_trips(tmp_path):
    """MAX_CODEBOOK_SIZE codes (fsq_levels of 2**15 codes, which check_config takes) fit int16: index 32767 is
    written and read back."""
    token_file = TokenFile.from_chunks(
        [torch.tensor([0, tokens.MAX_CODEBOOK_SIZE - 1])], [(4, 16, 16)], [0.0], model_config={}, weights_digest="",
        fps=8.0, source="x", frames_per_chunk=4, tail="drop", last_chunk_frames=4,
        codebook_size=tokens.MAX_CODEBOOK_SIZE,
    )  # fmt: skip
    save_tokens(tmp_path / "a.safetensors", token_file)
    assert load_tokens(tmp_path / "a.safetensors").clip_indices(0).tolist() == [0, tokens.MAX_CODEBOOK_SIZE - 1]


def test_a_chunk_of_no_tokens_or_a_negative_chunk_number_is_refused():
    """A clip has at least one token (decode refuses an empty one), and clip_indices(-1) is no chunk: it gave an
    empty slice, as if the last chunk had no tokens."""
    settings = dict(model_config={}, weights_digest="", fps=8.0, source="x", frames_per_chunk=4, tail="drop")
    settings.update(last_chunk_frames=4, codebook_size=CODEBOOK)
    with pytest.raises(TokenFileError, match=r"token_counts must be >= 1; chunk 1 has 0$"):
        TokenFile.from_chunks([torch.tensor([1]), torch.tensor([], dtype=torch.long)], [(4, 16, 16)] * 2,
                              [0.0, 0.5], **settings)  # fmt: skip
    token_file = TokenFile.from_chunks(
        [torch.tensor([1]), torch.tensor([2])], [(4, 16, 16)] * 2, [0.0, 0.5], **settings
    )
    with pytest.raises(IndexError, match="chunk -1 out of range for 2 chunks"):
        token_file.clip_indices(-1)


@pytest.mark.parametrize("field", ["fps", "chunk_seconds", "source_fps", "codebook_size"])
def test_a_bool_is_no_number_of_a_token_file(field):
    """JSON's true is Python's True, an int: a stranger's "fps": true would be 1 fps."""
    settings = dict(model_config={}, weights_digest="", fps=8.0, source="x", frames_per_chunk=4, tail="drop")
    settings.update(last_chunk_frames=4, codebook_size=CODEBOOK)
    settings[field] = True
    with pytest.raises(TokenFileError, match=rf"field '{field}' must be .*; got bool True"):
        TokenFile.from_chunks([torch.tensor([0])], [(4, 16, 16)], [0.0], **settings)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_reading_token_files_leaves_no_file_open(tmp_path, monkeypatch):
    """A resume reads every token file of its dataset (a million): each read closes what it opened, also when it
    refuses the file (not a regular file, too large)."""
    path = tmp_path / "a.safetensors"
    save_tokens(path, make_token_file())
    os.mkfifo(tmp_path / "pipe.safetensors")
    before = len(os.listdir("/proc/self/fd"))  # (a leak: 60 more after; another file closed meanwhile: fewer)
    for _ in range(20):
        load_tokens(path)
        assert try_load_tokens(tmp_path / "pipe.safetensors") is None
        with pytest.raises(TokenFileError, match="not a regular file"):
            load_tokens(tmp_path / "pipe.safetensors")
    monkeypatch.setattr(tokens, "MAX_FILE_BYTES", 100)
    for _ in range(20):
        assert try_load_tokens(path) is None
    assert len(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize("source_fps", [0.25, 1e300])
def test_source_frames_refuses_chunks_of_no_frame_or_past_exact_counting(source_fps):
    """A stranger's file may pair any fps with any source_fps: 16 frames at 8 fps from 0.25 fps is half a source
    frame a chunk (picks of -1 and 0 came out), from 1e300 fps more frames than a float counts exactly."""
    token_file = dataclasses.replace(make_token_file(), source_fps=source_fps)
    with pytest.raises(ValueError, match="make chunks of .* source frames"):
        token_file.source_frames()
