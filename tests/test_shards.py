"""Token files packed into tar shards (`pack`), and read from them in place: the same bytes and token files, a
rerun that keeps complete shards, failures that are one file's, and a folder that never mixes two runs' shards."""

import dataclasses
import errno
import io
import os
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from test_tokens import make_token_file

from titok_fast import archives, shards
from titok_fast.archives import list_archive
from titok_fast.cli import main
from titok_fast.files import MAX_PER_SHARD
from titok_fast.pipeline import collect_token_files, token_file_at
from titok_fast.shards import MAX_BESIDE_MEMBERS, pack_tokens, plan_shards, read_shard
from titok_fast.tokens import TokenFileError, load_tokens, save_tokens, try_load_tokens

from videos import make_truncated, make_video

GRID = ["--grid", "4x32x32", "--tokens", "8", "--fps", "8"]
RANDOM = ["--random-weights", "0", "--config", "tiny", "--device", "cpu"]


def run(*args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def token_folder(root: Path, names, **changes) -> Path:
    """Token files of ``names`` (paths below ``root``, without the suffix), each of other tokens."""
    for k, name in enumerate(names):
        path = root / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tokens(path, dataclasses.replace(make_token_file(counts=(5 + k % 3, 9)), **changes))
    return root


def same(a, b) -> bool:
    """Whether two TokenFiles hold the same tensors and fields."""
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) if isinstance(getattr(a, f.name), torch.Tensor)
               else getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a))  # fmt: skip


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar.getmembers()}


def test_shards_hold_the_token_files_byte_for_byte_in_name_order(tmp_path, capsys):
    names = ["b/2", "a/1", "a/3", "c", "b/10"]
    tokens = token_folder(tmp_path / "tokens", names)
    (tokens / "manifest.jsonl").write_text("{}\n")  # (not a token file: not packed)
    code, out, err = run("pack", tokens, "-o", tmp_path / "shards", "--per-shard", "2", capsys=capsys)
    assert code == 0, out + err
    assert "packed 5 token file(s), 10 chunk(s), into 3 shard(s)" in out
    shards = sorted((tmp_path / "shards").iterdir())
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    held = [members(s) for s in shards]
    assert [list(h) for h in held] == [["a/1.safetensors", "a/3.safetensors"],
                                       ["b/10.safetensors", "b/2.safetensors"], ["c.safetensors"]]  # fmt: skip
    for h in held:
        for member, data in h.items():
            assert data == (tokens / member).read_bytes()
    with tarfile.open(shards[0]) as tar:  # the token file's time, a plain file's mode, nobody's owner
        info = tar.getmember("a/1.safetensors")
        assert info.mtime == int((tokens / "a/1.safetensors").stat().st_mtime) and info.mode == 0o644
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
    unpacked = tmp_path / "unpacked"  # GNU tar reads them
    unpacked.mkdir()
    for shard in shards:
        subprocess.run(["tar", "-xf", shard, "-C", unpacked], check=True)
    assert sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*.safetensors")) == sorted(
        f"{n}.safetensors" for n in names
    )
    code, out, _ = run("pack", tokens, "-o", tmp_path / "a\nb", capsys=capsys)  # (the summary stays one line)
    assert code == 0 and f"shard(s) in {tmp_path}/a\\nb in " in out and len(out.splitlines()) == 1, out


def test_token_files_read_in_place_from_a_shard_equal_those_packed(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["x/1", "x/2", "y"])
    assert run("pack", tokens, "-o", tmp_path / "shards", capsys=capsys)[0] == 0
    shard = tmp_path / "shards" / "00000.tar"
    read = {name: token_file for name, token_file, _ in read_shard(shard)}
    assert list(read) == ["x/1", "x/2", "y"]
    for name, token_file in read.items():
        assert same(token_file, load_tokens(tokens / f"{name}.safetensors"))
        assert same(load_tokens(f"{shard}/{name}.safetensors"), token_file)  # by its path through the shard
    found = collect_token_files([tmp_path / "shards"])  # a shard in a folder stands for a folder of its name
    assert [(str(p), n) for p, n in found] == [(f"{shard}/{m}.safetensors", f"00000/{m}") for m in read]
    with pytest.raises(TokenFileError, match="no file 'z.safetensors' in the archive"):
        load_tokens(f"{shard}/z.safetensors")


def test_decode_reads_the_shards_of_its_token_files_in_place(tmp_path, capsys, monkeypatch):
    videos = tmp_path / "videos"
    for folder, count in (("s0", 2), ("s1", 1)):
        (videos / folder).mkdir(parents=True)
        for k in range(count):
            make_video(videos / folder / f"{k}.mp4", frames=12, height=32, width=48, fps=8)
    tokens = tmp_path / "tokens"
    assert run("encode", videos, "-o", tokens, *GRID, *RANDOM, capsys=capsys)[0] == 0
    code, out, err = run("pack", tokens, "-o", tmp_path / "shards", "--per-folder", capsys=capsys)
    assert code == 0 and "into 2 shard(s)" in out, out + err
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["s0.tar", "s1.tar"]
    assert list(members(tmp_path / "shards" / "s0.tar")) == ["0.safetensors", "1.safetensors"]
    reads, read_member = [], archives.read_member
    monkeypatch.setattr(archives, "read_member", lambda member: reads.append(member.name) or read_member(member))
    for source, out_folder in ((tokens, "from-files"), (tmp_path / "shards", "from-shards")):
        code, out, err = run("decode", source, "-o", tmp_path / out_folder, "--side-by-side", capsys=capsys)
        assert code == 0 and "decoded 3 file(s)" in out, out + err
    assert sorted(reads) == sorted(["0.safetensors", "1.safetensors", "0.safetensors"] * 2)  # each member once to
    # name the model, once to decode it (its record's digest and its tokens from the same bytes)
    for name in ("s0/0", "s0/1", "s1/0"):  # the same names, the same pixels
        assert np.array_equal(frames(tmp_path / "from-files" / f"{name}.mp4"),
                              frames(tmp_path / "from-shards" / f"{name}.mp4"))  # fmt: skip
    code, out, _ = run("decode", tmp_path / "shards", "-o", tmp_path / "from-shards", "--side-by-side", capsys=capsys)
    assert code == 0 and "decoded 0 file(s)" in out and "skipped 3 already complete" in out  # resumed


def frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_rerun_keeps_complete_shards_and_writes_again_only_a_changed_one(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", [f"{k:02d}" for k in range(6)])
    out_dir = tmp_path / "shards"
    assert run("pack", tokens, "-o", out_dir, "--per-shard", "2", capsys=capsys)[0] == 0
    before = {p.name: p.stat().st_ino for p in out_dir.iterdir()}
    code, out, _ = run("pack", tokens, "-o", out_dir, "--per-shard", "2", capsys=capsys)
    assert code == 0 and "into 0 shard(s)" in out and "kept 3 shard(s) already complete (6 token file(s))" in out
    assert {p.name: p.stat().st_ino for p in out_dir.iterdir()} == before
    save_tokens(tokens / "03.safetensors", make_token_file(counts=(4, 4)))  # made again, other tokens
    code, out, _ = run("pack", tokens, "-o", out_dir, "--per-shard", "2", capsys=capsys)
    assert code == 0 and "packed 2 token file(s)" in out and "kept 2 shard(s)" in out
    after = {p.name: p.stat().st_ino for p in out_dir.iterdir()}
    assert [name for name in before if after[name] != before[name]] == ["00001.tar"]
    assert members(out_dir / "00001.tar")["03.safetensors"] == (tokens / "03.safetensors").read_bytes()
    code, out, _ = run("pack", tokens, "-o", out_dir, "--per-shard", "2", "--overwrite", capsys=capsys)
    assert code == 0 and "into 3 shard(s)" in out


def test_a_token_file_that_is_not_valid_or_of_other_weights_fails_alone(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["1", "2", "3", "4"])
    token_folder(tmp_path / "tokens", ["5"], weights_digest="sha256:ffff")  # another model's
    data = bytearray((tokens / "2.safetensors").read_bytes())
    data[-1] ^= 1  # a flipped bit in a token
    (tokens / "2.safetensors").write_bytes(bytes(data))
    code, out, _ = run("pack", tokens, "-o", tmp_path / "shards", capsys=capsys)
    assert code == 1 and "packed 3 token file(s)" in out and "failed 2 token file(s), not packed" in out, out
    assert f"FAILED {tokens}/2.safetensors: " in out and "digest" in out and out.count("2.safetensors") == 1
    assert f"FAILED {tokens}/5.safetensors: made by other weights (sha256:ffff) than most of the token files " \
           "(sha256:0123abcd): not packed with them (--force packs it)" in out
    assert list(members(tmp_path / "shards" / "00000.tar")) == ["1.safetensors", "3.safetensors", "4.safetensors"]
    code, out, _ = run("pack", tokens, "-o", tmp_path / "shards", capsys=capsys)  # still failing: the shard is kept
    assert code == 1 and "kept 1 shard(s) already complete (3 token file(s))" in out and "failed 2" in out
    code, out, _ = run("pack", tokens, "-o", tmp_path / "forced", "--force", capsys=capsys)
    assert code == 1 and "packed 4 token file(s)" in out and "failed 1" in out


def test_a_folder_holding_other_shards_or_its_inputs_is_refused(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["a/1", "a/2", "b/1"])
    out_dir = tmp_path / "shards"
    assert run("pack", tokens, "-o", out_dir, "--per-shard", "1", capsys=capsys)[0] == 0
    code, _, err = run("pack", tokens, "-o", out_dir, "--per-shard", "2", capsys=capsys)  # another count
    assert code == 2 and f"{out_dir}/00002.tar: a tar archive in the output folder that is not one of the shards" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]  # untouched
    code, _, err = run("pack", tokens, "-o", tokens / "shards", capsys=capsys)
    assert code == 2 and "lies in the input folder" in err and not (tokens / "shards").exists()
    code, _, err = run("pack", out_dir / "00000.tar", "-o", out_dir, "--per-shard", "1", capsys=capsys)
    assert code == 2 and "lies in the output folder" in err
    top = token_folder(tmp_path / "top", ["t"]) / "t.safetensors"
    code, out, _ = run("pack", tokens, top, "-o", tmp_path / "f", "--per-folder", capsys=capsys)
    assert code == 1 and f"FAILED {top}: a token file in no folder below its input" in out, out
    assert "packed 3 token file(s)" in out and sorted(os.listdir(tmp_path / "f")) == ["a.tar", "b.tar"]


def test_shards_of_shards_and_names_tar_must_escape(tmp_path):
    names = ["é/ü", "x" * 150, "new\nline", "sp ace/#1"]
    tokens = token_folder(tmp_path / "tokens", names)
    files = collect_token_files([tokens])
    packed = pack_tokens(files, tmp_path / "shards", per_shard=3)
    assert not packed.failed and len(packed.written) == 2
    for shard in packed.written:  # listed by titok-fast's own header parser as tarfile lists them
        assert list(list_archive(shard).members) == list(members(Path(shard)))
    again = collect_token_files([tmp_path / "shards"])
    assert sorted(n.split("/", 1)[1] for _, n in again) == sorted(names)
    repacked = pack_tokens(again, tmp_path / "repacked", per_shard=10)  # shards read in place, packed again
    assert not repacked.failed and len(repacked.done) == 4
    for name, token_file, _ in read_shard(tmp_path / "repacked" / "00000.tar"):
        assert same(token_file, load_tokens(tokens / f"{name.split('/', 1)[1]}.safetensors"))


def test_a_shard_cut_short_is_written_again_and_read_as_cut(tmp_path):
    tokens = token_folder(tmp_path / "tokens", ["1", "2"])
    files = collect_token_files([tokens])
    pack_tokens(files, tmp_path / "shards")
    shard = tmp_path / "shards" / "00000.tar"
    make_truncated(tmp_path / "cut.tar", shard, keep=0.3)
    with pytest.raises(OSError, match="cut short"):
        list(read_shard(tmp_path / "cut.tar"))
    os.replace(tmp_path / "cut.tar", shard)
    assert list_archive(str(shard)).cut
    packed = pack_tokens(files, tmp_path / "shards")
    assert packed.written == [str(shard)] and len(packed.done) == 2 and not list_archive(str(shard)).cut


def test_an_interrupted_pack_leaves_no_shard_under_its_name(tmp_path, monkeypatch):
    tokens = token_folder(tmp_path / "tokens", ["1", "2", "3"])
    files = collect_token_files([tokens])
    from titok_fast import shards as module

    real, calls = module.read_token_bytes, []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(module, "read_token_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_tokens(files, tmp_path / "shards")
    assert os.listdir(tmp_path / "shards") == []  # neither the shard nor its temporary
    monkeypatch.undo()
    assert len(pack_tokens(files, tmp_path / "shards").done) == 3


def test_plan_by_count_names_and_bounds():
    files = [(f"/t/{k}.safetensors", f"{k:06d}") for k in range(23)]
    plan = plan_shards(files, per_shard=10)
    assert [s.name for s in plan] == ["00000", "00001", "00002"] and [len(s.files) for s in plan] == [10, 10, 3]
    assert [s.name for s in plan_shards(files, per_shard=1)][-1] == "00022"
    many = plan_shards([(f"/t/{k}", f"{k:07d}") for k in range(100_001)], per_shard=1)  # more never renames
    assert (many[0].name, many[-2].name, many[-1].name) == ("00000", "99999", "100000")
    with pytest.raises(ValueError, match="per_shard must be from 1"):
        plan_shards(files, per_shard=0)


def test_token_files_read_ahead_in_threads_pack_the_same_shards(tmp_path, monkeypatch):
    from titok_fast import shards as module

    tokens = token_folder(tmp_path / "tokens", [f"{k:03d}" for k in range(40)])
    bad = tokens / "017.safetensors"
    bad.write_bytes(bad.read_bytes()[:-3])  # cut short: fails alone, whoever reads it
    files = collect_token_files([tokens])
    alone = pack_tokens(files, tmp_path / "alone", per_shard=16)
    monkeypatch.setattr(module, "_threads_for", lambda *paths: 4)  # as on a network file system
    monkeypatch.setattr(module, "FETCH_CHUNK_BYTES", 3000)  # a thread reads a few of its chunk's files, not all
    ahead = pack_tokens(files, tmp_path / "ahead", per_shard=16)
    assert ahead.failed == alone.failed and len(ahead.failed) == 1 and ahead.done == alone.done
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "ahead" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
    again = pack_tokens(files, tmp_path / "ahead", per_shard=16)
    assert len(again.kept) == 3 and again.failed == alone.failed


def test_with_packs_the_files_beside_each_source_under_its_key(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for k in range(4):
        make_video(tmp_path / f"{k}.mp4", frames=12, height=32, width=48, fps=8)
    with tarfile.open(videos / "00000.tar", "w") as tar:  # a video2dataset shard: a video, its record and caption
        for k in (0, 1, 3):  # (000000003: no caption)
            for extension, data in (("mp4", (tmp_path / f"{k}.mp4").read_bytes()), ("json", b'{"k": %d}' % k),
                                    ("txt", b"a caption %d" % k)):  # fmt: skip
                if k == 3 and extension == "txt":
                    continue
                info = tarfile.TarInfo(f"00000000{k}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (videos / "loose").mkdir()  # a plain file with a caption beside it, and one without
    for k, caption in ((1, b"loose caption"), (2, None)):
        os.replace(tmp_path / f"{k}.mp4", videos / "loose" / f"v{k}.mp4")
        if caption:
            (videos / "loose" / f"v{k}.txt").write_bytes(caption)
            (videos / "loose" / f"v{k}.json").write_bytes(b"{}")
    tokens = tmp_path / "tokens"
    assert run("encode", videos, "-o", tokens, *GRID, *RANDOM, capsys=capsys)[0] == 0
    code, out, _ = run("pack", tokens, "-o", tmp_path / "shards", "--per-folder", "--with", "json,txt", capsys=capsys)
    assert code == 0 and "packed 5 token file(s)" in out and "FAILED" not in out, out  # (what is missing: said)
    assert "\n1 token file(s) in them without a .json (none beside their source)\n" in out
    assert out.endswith("\n2 token file(s) in them without a .txt (none beside their source)\n"), out
    held = members(tmp_path / "shards" / "00000.tar")
    assert list(held) == [f"00000000{k}.{e}" for k in (0, 1) for e in ("safetensors", "json", "txt")] + [
        "000000003.safetensors", "000000003.json"]  # fmt: skip
    assert held["000000001.txt"] == b"a caption 1" and held["000000000.json"] == b'{"k": 0}'
    samples = [(name, beside) for name, _, beside in read_shard(tmp_path / "shards" / "00000.tar")]
    assert samples == [(f"00000000{k}", {"json": b'{"k": %d}' % k, "txt": b"a caption %d" % k}) for k in (0, 1)] + [
        ("000000003", {"json": b'{"k": 3}'})]  # fmt: skip
    assert list(members(tmp_path / "shards" / "loose.tar")) == ["v1.safetensors", "v1.json", "v1.txt",
                                                                 "v2.safetensors"]  # fmt: skip
    (videos / "loose" / "v2.json").write_bytes(b"{}")
    (videos / "loose" / "v2.txt").write_bytes(b"late caption")
    code, out, _ = run("pack", tokens, "-o", tmp_path / "shards", "--per-folder", "--with", "json,txt", capsys=capsys)
    assert code == 0 and "packed 2 token file(s)" in out and "kept 1 shard(s) already complete" in out, out
    assert out.endswith("\n1 token file(s) in them without a .txt (none beside their source)\n"), out
    (videos / "loose" / "v2.txt").unlink()  # there, but not a file that can be packed: that token file fails alone
    (videos / "loose" / "v2.txt").mkdir()
    code, out, _ = run("pack", tokens, "-o", tmp_path / "folder", "--per-folder", "--with", "txt", capsys=capsys)
    assert code == 1 and f"FAILED {tokens}/loose/v2.safetensors: {videos}/loose/v2.txt, beside its source, cannot " \
        "be packed" in out, out  # fmt: skip
    os.utime(videos / "loose" / "v1.mp4", ns=(0, 0))  # the source is no longer the file the tokens were made from
    code, out, _ = run("pack", tokens, "-o", tmp_path / "again", "--per-folder", "--with", "txt", capsys=capsys)
    assert code == 1 and "v1.mp4' is not the file its tokens were made from" in out, out


def test_with_reads_nothing_a_strangers_token_file_names(tmp_path, capsys):
    (tmp_path / "secret.txt").write_text("not for a shard")
    (tmp_path / "secret.mp4").write_bytes(b"\0" * 100)
    secret = str(tmp_path / "secret.mp4")
    token_folder(tmp_path / "tokens", ["a"], source=secret)  # records no source stamp
    token_folder(tmp_path / "tokens", ["b"], source=secret, made_with={"source_stamp": "100:1"})  # a wrong one
    code, out, _ = run("pack", tmp_path / "tokens", "-o", tmp_path / "shards", "--with", "txt", capsys=capsys)
    assert code == 1 and "a.safetensors: records no size and modification time of its source" in out, out
    assert "b.safetensors: its source" in out and "is not the file its tokens were made from" in out
    assert members(tmp_path / "shards" / "00000.tar") == {}
    for given in ("safetensors", ".txt", "json,json", "a/b", ""):
        with pytest.raises(SystemExit) as exited:
            main(["pack", str(tmp_path / "tokens"), "-o", str(tmp_path / "x"), "--with", given])
        assert exited.value.code == 2 and "argument --with: " in capsys.readouterr().err, given


def test_a_strangers_token_file_naming_a_member_of_another_archive_has_it_read_by_neither_pack_nor_decode(
    tmp_path, capsys, monkeypatch
):
    """A token file whose source is a member of an archive (``private.tar/clip.mp4``) had that archive opened and
    its headers read by ``pack --with`` and ``decode --side-by-side`` before its recorded stamp was compared: any
    tar file the user can read. Nothing is opened unless the archive's time is the one the file records."""
    from titok_fast.pipeline import source_chunks

    private = tmp_path / "private.tar"
    with tarfile.open(private, "w") as tar:
        info = tarfile.TarInfo("clip.mp4")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"data"))
    source = f"{private}/clip.mp4"
    token_folder(tmp_path / "tokens", ["a"], source=source, made_with={"source_stamp": "4:1"})
    listed = []
    real = archives.list_archive
    monkeypatch.setattr(archives, "list_archive", lambda p, *a, **k: listed.append(str(p)) or real(p, *a, **k))
    code, out, _ = run("pack", tmp_path / "tokens", "-o", tmp_path / "shards", "--with", "json", capsys=capsys)
    assert code == 1 and "a.safetensors: its source" in out and "is not the file its tokens were made from" in out
    with pytest.raises(ValueError, match="is not the file its tokens were made from"):
        next(source_chunks(load_tokens(tmp_path / "tokens" / "a.safetensors")))
    assert str(private) not in listed
    stamp = f"4:{private.stat().st_mtime_ns}"  # the archive's time, as a token file made from it records: listed
    token_folder(tmp_path / "tokens", ["a"], source=source, made_with={"source_stamp": stamp})
    assert run("pack", tmp_path / "tokens", "-o", tmp_path / "shards", "--with", "json", capsys=capsys)[0] == 0
    assert str(private) in listed


def test_the_readmes_example_of_reading_shards_runs_as_written(tmp_path, capsys, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("Reading shards that `pack` wrote:")[1].split("```python\n", 1)[1].split("```")[0]
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(tmp_path / "v.mp4", frames=12, height=32, width=48, fps=8)
    with tarfile.open(videos / "00000.tar", "w") as tar:
        for extension, data in (("mp4", (tmp_path / "v.mp4").read_bytes()), ("txt", b"a caption")):
            info = tarfile.TarInfo(f"000000001.{extension}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert run("encode", videos, "-o", tmp_path / "tokens", *GRID, *RANDOM, capsys=capsys)[0] == 0
    command = ["pack", tmp_path / "tokens", "-o", tmp_path / "token-shards", "--per-folder", "--with", "txt"]
    assert run(*command, capsys=capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(block, "README.md", "exec"), names)
    assert names["caption"] == "a caption" and names["name"] == "000000001"
    assert same(names["tf"], load_tokens(tmp_path / "tokens" / "00000" / "000000001.safetensors"))


def test_a_link_to_a_shard_in_the_output_folder_is_refused_as_an_input(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["1", "2"])
    assert run("pack", tokens, "-o", tmp_path / "shards", capsys=capsys)[0] == 0
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "shards" / "00000.tar", tmp_path / "elsewhere" / "linked.tar")
    before = (tmp_path / "shards" / "00000.tar").read_bytes()
    code, _, err = run("pack", tmp_path / "elsewhere", "-o", tmp_path / "shards", "--overwrite", capsys=capsys)
    assert code == 2 and "lies in the output folder" in err
    assert (tmp_path / "shards" / "00000.tar").read_bytes() == before


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_video_named_with_leading_dots_is_named_as_a_file_is_in_an_archive_too(tmp_path, capsys):
    """A member ``...mp4`` is a video named ``..``, as a plain file ``...mp4`` is (``Path.suffix``), and its caption
    is ``...txt`` in either: ``posixpath.splitext``, which sees no suffix there, had the member's token file named
    ``...mp4.safetensors`` and the captions of both looked for as ``...mp4.txt``."""
    videos = tmp_path / "videos"
    (videos / "loose").mkdir(parents=True)
    make_video(videos / "loose" / "...mp4", frames=12, height=32, width=48, fps=8)
    (videos / "loose" / "...txt").write_bytes(b"loose caption")
    with tarfile.open(videos / "00000.tar", "w") as tar:
        add(tar, "...mp4", (videos / "loose" / "...mp4").read_bytes())
        add(tar, "...txt", b"a caption")
    tokens = tmp_path / "tokens"
    assert run("encode", videos, "-o", tokens, *GRID, *RANDOM, capsys=capsys)[0] == 0
    assert sorted(str(p.relative_to(tokens)) for p in tokens.rglob("*.safetensors")) == [
        "00000/...safetensors", "loose/...safetensors"]  # fmt: skip
    code, out, _ = run("pack", tokens, "-o", tmp_path / "shards", "--per-folder", "--with", "txt", capsys=capsys)
    assert code == 0 and "packed 2 token file(s)" in out and "without" not in out, out
    assert [(name, beside) for name, _, beside in read_shard(tmp_path / "shards" / "00000.tar")] == [
        ("..", {"txt": b"a caption"})]  # fmt: skip
    assert list(members(tmp_path / "shards" / "loose.tar"))[1:] == ["...txt"]
    with pytest.raises(TokenFileError, match=r"\.\.\.mp4: a video file, not a token file"):  # (given to decode)
        token_file_at(videos / "loose" / "...mp4")


def test_read_shard_groups_members_in_linear_time_and_bounds_what_it_reads_beside(tmp_path):
    tokens = token_folder(tmp_path / "tokens", ["x", "y", "z"])
    data = {n: (tokens / f"{n}.safetensors").read_bytes() for n in "xyz"}
    shard = tmp_path / "crafted.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "x.json", b"{}")  # before its token file, as a writer in name order puts it
        add(tar, "x.safetensors", data["x"])
        add(tar, "x" + "." * 200_000, b"dots")  # a name of 200,000 dots: every prefix would be 20 GB
        add(tar, "x.sub/y.txt", b"not x's")  # (a "/" after the dot: another folder's)
        add(tar, "y.safetensors", data["y"])
        for k in range(MAX_BESIDE_MEMBERS + 1):  # more members beside one token file than are read
            add(tar, f"y.{k}", b"")
        add(tar, "z.safetensors", data["z"])
        add(tar, "z.txt", b"caption")
    tracemalloc.start()
    with pytest.raises(TokenFileError, match=f"y.safetensors: {MAX_BESIDE_MEMBERS + 1} members beside it"):
        list(read_shard(shard))
    read = [(name, beside) for name, _, beside in read_shard(shard, skip_invalid=True)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert read == [("x", {"json": b"{}", "." * 199_999: b"dots"}), ("z", {"txt": b"caption"})]
    assert peak < 16 << 20, peak  # (the listing, and a few copies of the long name)


def test_read_ahead_holds_at_most_its_budget_of_token_files_and_files_beside(tmp_path, monkeypatch):
    from titok_fast import shards as module

    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "v.mp4", frames=12, height=32, width=48, fps=8)
    (videos / "v.big").write_bytes(b"\0" * 5000)
    tokens = tmp_path / "tokens"
    main(["encode", str(videos), "-o", str(tokens), *GRID, *RANDOM])
    made = tokens / "v.safetensors"
    for k in range(6):  # token files of ~1.5 KB
        os.link(made, tokens / f"c{k}.safetensors")
    chunk = [(str(tokens / f"c{k}.safetensors"), f"c{k}.safetensors") for k in range(6)]
    monkeypatch.setattr(module, "FETCH_CHUNK_BYTES", 4000)
    read = module._read_chunk(chunk, None, ())
    assert [type(r).__name__ for r in read] == ["_Read"] * 2 + ["NoneType"] * 4  # (the third would pass 4000)
    assert module._read_chunk(chunk[:1], None, ("big",)) == [None]  # its file beside is over the budget
    assert isinstance(module._read(*chunk[0], None, ("big",)), module._Read)  # the consumer reads it whole


def test_an_output_folder_in_a_folder_a_list_names_is_refused(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["a/1", "a/2"])
    (tmp_path / "list.txt").write_text("tokens\n")
    code, _, err = run("pack", tmp_path / "list.txt", "-o", tokens / "shards", capsys=capsys)
    assert code == 2 and f"lies in the input folder {tokens}" in err and not (tokens / "shards").exists()


def test_archives_beside_token_files_that_hold_none_are_passed_over(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["a/1", "a/2"])
    make_video(tmp_path / "v.mp4", frames=12, height=32, width=48, fps=8)
    with tarfile.open(tokens / "videos.tar", "w") as tar:  # a shard of videos, a backup: beside, not token files
        add(tar, "v.mp4", (tmp_path / "v.mp4").read_bytes())
    (tokens / "cut.tar").write_bytes((tokens / "videos.tar").read_bytes()[:2000])  # cut before any token file
    (tokens / "gz.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    (tokens / "notes.tar").write_text("not an archive")
    code, out, err = run("pack", tokens, "-o", tmp_path / "shards", capsys=capsys)
    assert code == 0 and "packed 2 token file(s)" in out and "LEFT OUT" not in out, out
    assert "cut.tar: cut short" in err and "before any token file; passed over" in err and "gz.tar: a gzip" in err
    assert "videos.tar: no token file in it; passed over" in err
    pack_tokens(collect_token_files([tokens]), tmp_path / "cut-shards")  # a shard of token files cut short: its
    whole = (tmp_path / "cut-shards" / "00000.tar").read_bytes()  # files past the cut are unknown
    (tokens / "tokens.tar").write_bytes(whole[:2500])
    code, out, _ = run("pack", tokens, "-o", tmp_path / "shards2", capsys=capsys)
    assert code == 1 and f"LEFT OUT {tokens}/tokens.tar: cut short" in out, out


def test_what_is_under_a_shards_name_and_is_not_one_is_kept(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["1"])
    for kind, make in (("a FIFO", os.mkfifo), ("a folder", os.mkdir)):
        out_dir = tmp_path / kind.split()[1]
        out_dir.mkdir()
        make(out_dir / "00000.tar")
        code, _, err = run("pack", tokens, "-o", out_dir, capsys=capsys)  # (a FIFO: never opened)
        assert code == 2 and f"{out_dir}/00000.tar is {kind}, where a shard is to be written: kept" in err, err
    out_dir = tmp_path / "user"
    out_dir.mkdir()
    (out_dir / "00000.tar").write_text("a user's notes")
    code, _, err = run("pack", tokens, "-o", out_dir, capsys=capsys)
    assert code == 2 and "00000.tar is no tar archive (not a shard pack wrote): kept; --overwrite" in err
    assert (out_dir / "00000.tar").read_text() == "a user's notes"
    assert run("pack", tokens, "-o", out_dir, "--overwrite", capsys=capsys)[0] == 0
    assert list(members(out_dir / "00000.tar")) == ["1.safetensors"]


def test_shards_that_cannot_be_written_fail_their_files_alone(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["a/1", "b" * 254 + "/2", "c/3"])  # b...b.tar: a name too long
    code, out, _ = run("pack", tokens, "-o", tmp_path / "shards", "--per-folder", capsys=capsys)
    assert code == 1 and "packed 2 token file(s)" in out and "cannot write its shard" in out, out
    assert sorted(os.listdir(tmp_path / "shards")) == ["a.tar", "c.tar"]
    clash = token_folder(tmp_path / "clash", ["x/1", "x.tar/y/2"])  # shard x.tar and a folder x.tar of shard y
    code, _, err = run("pack", clash, "-o", tmp_path / "clash-shards", "--per-folder", capsys=capsys)
    assert code == 2 and "shard x.tar/y would be written in a folder" in err
    assert not (tmp_path / "clash-shards").exists()


def test_a_killed_runs_temporaries_are_removed_where_its_shards_are_kept(tmp_path):
    tokens = token_folder(tmp_path / "tokens", ["1", "2"])
    files = collect_token_files([tokens])
    pack_tokens(files, tmp_path / "shards")
    left = tmp_path / "shards" / f".00000.tar.{'0' * 32}.tmp"  # a killed writer's (no lock held on it)
    left.write_bytes(b"partial")
    mine = tmp_path / "shards" / ".notes.txt.tmp"  # a user's, of another form
    mine.write_bytes(b"kept")
    assert pack_tokens(files, tmp_path / "shards").kept
    assert not left.exists() and mine.exists()


def test_pack_looks_for_a_killed_runs_temporaries_once_not_once_a_shard(tmp_path, monkeypatch):
    """A run writing S shards into one folder looked through the whole folder for temporaries before each shard:
    S^2 / 2 names (20,000 --per-folder shards: 6 minutes). It sweeps them once, up front, and still removes them."""
    tokens = token_folder(tmp_path / "tokens", [str(k) for k in range(6)])
    files = collect_token_files([tokens])
    (tmp_path / "shards").mkdir()
    left = tmp_path / "shards" / f".00003.tar.{'0' * 32}.tmp"  # a killed writer's, for a shard written now
    left.write_bytes(b"partial")
    listed, listdir = [], os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": listed.append(os.fspath(path)) or listdir(path))
    assert len(pack_tokens(files, tmp_path / "shards", per_shard=1).written) == 6
    assert str(tmp_path / "shards") not in listed and not left.exists()


def test_pack_says_its_own_options_and_names(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.safetensors").write_bytes(b"junk")
    code, _, err = run("pack", tmp_path / "junk", "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "none of the 1 file(s) given is a readable token file" in err and "--checkpoint" not in err
    one, two = token_folder(tmp_path / "one", ["a"]), token_folder(tmp_path / "two", ["a"])
    code, _, err = run("pack", one, two, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "would both write a.safetensors" in err and ".mp4" not in err


def test_a_shard_replaced_while_it_is_read_is_read_as_it_is_now(tmp_path, monkeypatch):
    from titok_fast import archives

    tokens = token_folder(tmp_path / "tokens", ["1", "2", "3"])
    files = collect_token_files([tokens])
    pack_tokens(files, tmp_path / "old", per_shard=3)
    pack_tokens(files[1:], tmp_path / "new", per_shard=3)  # the same names, other places
    shard = tmp_path / "old" / "00000.tar"
    real = archives.member_of

    def listed_then_replaced(path):
        found = real(path)
        if found is not None and (tmp_path / "new" / "00000.tar").exists():
            os.replace(tmp_path / "new" / "00000.tar", shard)  # written again by rename, between list and read
        return found

    monkeypatch.setattr(archives, "member_of", listed_then_replaced)
    read = load_tokens(f"{shard}/2.safetensors")
    assert same(read, load_tokens(tokens / "2.safetensors"))  # not the bytes at 2's old place (1's or 3's)
    old_stat = os.stat(tmp_path / "old")  # a listing asked for an archive as it was stat'd, replaced since
    with pytest.raises(archives.ArchiveChanged):
        archives._listed(str(shard), old_stat.st_dev, old_stat.st_ino, 1, 1)


def test_encode_takes_no_token_file_inside_an_archive_in_its_output_folder_as_complete(tmp_path, capsys):
    videos = tmp_path / "videos" / "clips.tar"  # a folder named as an archive
    videos.mkdir(parents=True)
    make_video(videos / "v.mp4", frames=12, height=32, width=48, fps=8)
    out = tmp_path / "out"
    assert run("encode", tmp_path / "videos", "-o", out, *GRID, *RANDOM, capsys=capsys)[0] == 0
    os.replace(out / "clips.tar", tmp_path / "aside")
    with tarfile.open(out / "clips.tar", "w") as tar:  # the same token file, now in an archive of that name
        add(tar, "v.safetensors", (tmp_path / "aside" / "v.safetensors").read_bytes())
    assert try_load_tokens(out / "clips.tar" / "v.safetensors") is None  # (no file encode could write)
    assert load_tokens(out / "clips.tar" / "v.safetensors")  # (read in place all the same)
    code, out_text, _ = run("encode", tmp_path / "videos", "-o", out, *GRID, *RANDOM, capsys=capsys)
    assert code == 1 and "skipped 0 already complete; 1 failed" in out_text, out_text


def test_a_shard_named_with_a_slash_after_it_is_the_shard(tmp_path):
    tokens = token_folder(tmp_path / "tokens", ["1"])
    pack_tokens(collect_token_files([tokens]), tmp_path / "shards")
    shard = tmp_path / "shards" / "00000.tar"
    assert collect_token_files([f"{shard}/"]) == collect_token_files([shard])
    assert same(load_tokens(f"{shard}//1.safetensors"), load_tokens(tokens / "1.safetensors"))


def test_read_shard_reads_the_file_it_listed_when_the_shard_is_written_again_between(tmp_path, monkeypatch):
    from titok_fast import archives as module

    tokens = token_folder(tmp_path / "tokens", ["a", "b"])
    pack_tokens(collect_token_files([tokens]), tmp_path / "old")
    pack_tokens(collect_token_files([tokens / "b.safetensors"]), tmp_path / "new")  # b alone, at a's place
    shard, real = tmp_path / "old" / "00000.tar", module.list_archive

    def replaced_first(path, *args, **kwargs):
        if (tmp_path / "new" / "00000.tar").exists():
            os.replace(tmp_path / "new" / "00000.tar", shard)  # written again by rename, after read_shard opened it
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, "list_archive", replaced_first)
    read = [(name, token_file) for name, token_file, _ in read_shard(shard)]
    assert [name for name, _ in read] == ["b"] and same(read[0][1], load_tokens(tokens / "b.safetensors"))


def test_a_member_of_an_archive_appended_to_while_it_is_read_is_read(tmp_path, monkeypatch):
    from titok_fast import archives as module

    tokens = token_folder(tmp_path / "tokens", ["a"])
    pack_tokens(collect_token_files([tokens]), tmp_path / "shards")
    shard, real = tmp_path / "shards" / "00000.tar", module.member_of

    def appended_after(path):  # a writer appending to it between every listing and every read
        found = real(path)
        with open(shard, "ab") as file:
            file.write(b"\0" * 512)
        return found

    monkeypatch.setattr(module, "member_of", appended_after)
    assert same(load_tokens(f"{shard}/a.safetensors"), load_tokens(tokens / "a.safetensors"))


def test_read_shard_gives_a_member_between_two_token_files_to_the_name_it_is_of(tmp_path):
    tokens = token_folder(tmp_path / "tokens", ["clip", "clip.v2", "a", "b"])
    data = {n: (tokens / f"{n}.safetensors").read_bytes() for n in ("clip", "clip.v2", "a", "b")}
    shard = tmp_path / "sorted.tar"
    with tarfile.open(shard, "w") as tar:  # in name order, as tar --sort=name writes it
        for name, what in (("clip.json", b"1"), ("clip.safetensors", data["clip"]), ("clip.v2.json", b"2"),
                           ("clip.v2.safetensors", data["clip.v2"]), ("a.safetensors", data["a"]), ("x.txt", b"x"),
                           ("a.json", b"3"), ("b.safetensors", data["b"])):  # fmt: skip
            add(tar, name, what)
    read = {name: beside for name, _, beside in read_shard(shard)}
    assert read == {"clip": {"json": b"1"}, "clip.v2": {"json": b"2"}, "a": {"json": b"3"}, "b": {}}


def test_a_shard_cut_short_within_its_first_block_is_written_again(tmp_path, capsys):
    tokens = token_folder(tmp_path / "tokens", ["1"])
    out_dir = tmp_path / "shards"
    assert run("pack", tokens, "-o", out_dir, capsys=capsys)[0] == 0
    whole = (out_dir / "00000.tar").read_bytes()
    for keep in (0, 300):  # (a copy cut short: no user's file)
        (out_dir / "00000.tar").write_bytes(whole[:keep])
        code, out, err = run("pack", tokens, "-o", out_dir, capsys=capsys)
        assert code == 0 and "into 1 shard(s)" in out, out + err
        assert (out_dir / "00000.tar").read_bytes() == whole


def test_read_shard_refuses_what_is_no_shard_in_one_line_naming_it(tmp_path):
    os.mkfifo(tmp_path / "fifo.tar")
    (tmp_path / "notes.tar").write_text("not an archive")
    with pytest.raises(OSError, match=f"^{tmp_path}/fifo.tar: a FIFO, not a regular file$"):  # (never waited on)
        list(read_shard(tmp_path / "fifo.tar"))
    with pytest.raises(OSError, match=f"^{tmp_path}/notes.tar: not a tar archive"):
        list(read_shard(tmp_path / "notes.tar"))


def test_a_video_decoded_from_a_shard_is_kept_when_the_shard_is_written_again_around_it(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for k in range(3):
        make_video(videos / f"{k}.mp4", frames=12, height=32, width=48, fps=8 + k)
    tokens, shards, recon = tmp_path / "tokens", tmp_path / "shards", tmp_path / "recon"
    assert run("encode", videos, "-o", tokens, *GRID, *RANDOM, capsys=capsys)[0] == 0
    assert run("pack", tokens, "-o", shards, capsys=capsys)[0] == 0
    assert "decoded 3 file(s)" in run("decode", shards, "-o", recon, capsys=capsys)[1]
    before = {p.name: p.stat().st_mtime_ns for p in (recon / "00000").iterdir()}
    assert run("pack", tokens, "-o", shards, "--overwrite", capsys=capsys)[0] == 0  # the same bytes, a new shard
    code, out, _ = run("decode", shards, "-o", recon, capsys=capsys)
    assert code == 0 and "decoded 0 file(s)" in out and "skipped 3 already complete" in out, out
    (videos / "1.mp4").unlink()
    make_video(videos / "1.mp4", frames=20, height=32, width=48, fps=8)  # one video made again: its tokens too
    assert run("encode", videos, "-o", tokens, *GRID, *RANDOM, capsys=capsys)[0] == 0
    assert "packed 3 token file(s)" in run("pack", tokens, "-o", shards, capsys=capsys)[1]
    code, out, _ = run("decode", shards, "-o", recon, capsys=capsys)
    assert code == 0 and "decoded 1 file(s)" in out and "skipped 2 already complete" in out, out
    after = {p.name: p.stat().st_mtime_ns for p in (recon / "00000").iterdir()}
    assert [name for name in before if after[name] != before[name]] == ["1.mp4"]


def test_recorded_digest_reads_the_header_alone_and_nothing_else(tmp_path):
    from titok_fast.tokens import recorded_digest

    token_folder(tmp_path, ["a"])
    data = (tmp_path / "a.safetensors").read_bytes()
    assert recorded_digest(data) == read_raw_digest(tmp_path / "a.safetensors")
    for junk in (b"", b"\xff" * 8, data[:40], (10**9).to_bytes(8, "little") + data[8:], b"{}" + data):
        assert recorded_digest(junk) is None


def read_raw_digest(path: Path) -> str:
    from test_tokens import read_raw

    return read_raw(path)[1]["digest"]


def test_pack_packs_beside_a_token_file_no_more_than_read_shard_reads(tmp_path, monkeypatch, capsys):
    from titok_fast import shards as module

    monkeypatch.setattr(module, "MAX_BESIDE_BYTES", 100)
    videos = tmp_path / "videos"
    videos.mkdir()
    for k, sizes in enumerate(((40, 30), (60, 50))):  # together within the limit, then past it
        make_video(videos / f"{k}.mp4", frames=12, height=32, width=48, fps=8)
        for extension, size in zip(("json", "txt"), sizes, strict=True):
            (videos / f"{k}.{extension}").write_bytes(b"x" * size)
    assert run("encode", videos, "-o", tmp_path / "tokens", *GRID, *RANDOM, capsys=capsys)[0] == 0
    code, out, _ = run("pack", tmp_path / "tokens", "-o", tmp_path / "shards", "--with", "json,txt", capsys=capsys)
    assert code == 1 and "packed 1 token file(s)" in out, out
    assert "1.safetensors: the files beside its source hold 110 bytes or more together; at most 100" in out
    assert [name for name, _, _ in read_shard(tmp_path / "shards" / "00000.tar")] == ["0"]  # what pack wrote reads
    monkeypatch.setattr(module, "MAX_BESIDE_BYTES", 60)
    with pytest.raises(TokenFileError, match="0.safetensors: 2 members beside it, 70 bytes; read_shard reads at most"):
        list(read_shard(tmp_path / "shards" / "00000.tar"))


def test_read_shard_of_a_folder_says_so_and_keeps_no_descriptor(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(OSError, match=f"^{tmp_path}: a folder, not a regular file$"):
            list(read_shard(tmp_path))
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_token_file_made_again_at_the_same_size_has_its_shard_written_again(tmp_path):
    """A rerun keeps a shard only where its members are the token files' bytes: a token file made again with other
    tokens of the same shape (the same size, other bytes) has its shard written again, not a stale one kept."""
    tokens = token_folder(tmp_path / "tokens", ["1", "2"])
    files = collect_token_files([tokens])
    pack_tokens(files, tmp_path / "shards")
    before = (tokens / "2.safetensors").read_bytes()
    save_tokens(tokens / "2.safetensors", make_token_file(counts=(6, 9)))  # (token_folder's shape for k=1)
    after = (tokens / "2.safetensors").read_bytes()
    assert len(after) == len(before) and after != before  # (the premise: same size, other bytes)
    packed = pack_tokens(files, tmp_path / "shards")
    assert packed.written == [str(tmp_path / "shards" / "00000.tar")] and not packed.kept
    assert members(tmp_path / "shards" / "00000.tar")["2.safetensors"] == after


def test_a_token_file_renamed_has_its_shard_written_again_under_the_new_name(tmp_path):
    """The same bytes under another name are not the same shard: it is written again under the new name."""
    tokens = token_folder(tmp_path / "tokens", ["a"])
    pack_tokens(collect_token_files([tokens]), tmp_path / "shards")
    os.replace(tokens / "a.safetensors", tokens / "b.safetensors")
    packed = pack_tokens(collect_token_files([tokens]), tmp_path / "shards")
    assert not packed.kept and list(members(tmp_path / "shards" / "00000.tar")) == ["b.safetensors"]


def test_a_shard_holding_more_than_the_token_files_it_would_hold_is_written_again(tmp_path):
    """A token file gone from the inputs (or one that fails now) does not stay in a shard a rerun keeps."""
    tokens = token_folder(tmp_path / "tokens", ["1", "2"])
    pack_tokens(collect_token_files([tokens]), tmp_path / "shards")
    (tokens / "2.safetensors").unlink()
    packed = pack_tokens(collect_token_files([tokens]), tmp_path / "shards")
    assert not packed.kept and list(members(tmp_path / "shards" / "00000.tar")) == ["1.safetensors"]


def test_a_shard_with_a_link_added_is_written_again(tmp_path):
    """A shard holding a member its listing leaves out (a link someone appended) is not complete: written again."""
    tokens = token_folder(tmp_path / "tokens", ["1"])
    files = collect_token_files([tokens])
    pack_tokens(files, tmp_path / "shards")
    shard = tmp_path / "shards" / "00000.tar"
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("evil.txt")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    packed = pack_tokens(files, tmp_path / "shards")
    assert not packed.kept and list(members(shard)) == ["1.safetensors"]


def test_members_are_in_name_order_not_path_order(tmp_path, capsys):
    """Members go into shards in the order of their names, as the module says, not of their inputs' paths: two
    inputs whose folders sort the other way round from their files' names."""
    token_folder(tmp_path / "z_input", ["a"])
    token_folder(tmp_path / "a_input", ["b"])
    code, out, err = run("pack", tmp_path / "z_input", tmp_path / "a_input", "-o", tmp_path / "shards", capsys=capsys)
    assert code == 0, out + err
    assert list(members(tmp_path / "shards" / "00000.tar")) == ["a.safetensors", "b.safetensors"]


def test_the_largest_per_shard_the_cli_takes_is_taken(tmp_path):
    """--per-shard takes up to MAX_PER_SHARD, and plan_shards takes what the CLI takes (one past it refused)."""
    assert [s.name for s in plan_shards([("/t/a.safetensors", "a")], per_shard=MAX_PER_SHARD)] == ["00000"]
    with pytest.raises(ValueError):
        plan_shards([("/t/a.safetensors", "a")], per_shard=MAX_PER_SHARD + 1)


def test_a_full_disk_stops_the_run_instead_of_failing_every_shard(tmp_path, monkeypatch):
    """A full disk stops the run at the first shard with one error, rather than failing every shard's token files
    one by one (and exiting 1 as if they were bad)."""
    tokens = token_folder(tmp_path / "tokens", ["1", "2", "3"])
    calls = []

    def full(path, read, done):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "_write", full)
    with pytest.raises(OSError, match="the run stops"):
        pack_tokens(collect_token_files([tokens]), tmp_path / "shards", per_shard=1)
    assert len(calls) == 1  # stopped at the first shard


def test_per_folder_members_are_in_name_order_whatever_order_they_are_given_in(tmp_path):
    """With --per-folder, too, a caller's pairs (pack_tokens is public) given out of order are packed in name order."""
    tokens = token_folder(tmp_path / "tokens", ["a/2", "a/1", "a/3"])
    files = list(reversed(collect_token_files([tokens])))
    pack_tokens(files, tmp_path / "shards", per_shard=None)
    assert list(members(tmp_path / "shards" / "a.tar")) == ["1.safetensors", "2.safetensors", "3.safetensors"]


def test_a_member_whose_name_only_begins_with_a_token_files_name_is_not_beside_it(tmp_path):
    """Beside ``clip`` are the members ``clip.<extension>``: ``clip_meta.json`` (another key) is not, though its name
    begins with ``clip``."""
    tokens = token_folder(tmp_path / "tokens", ["clip"])
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "clip.safetensors", (tokens / "clip.safetensors").read_bytes())
        add(tar, "clip.txt", b"mine")
        add(tar, "clip_meta.json", b"not clip's")
    assert [(name, beside) for name, _, beside in read_shard(shard)] == [("clip", {"txt": b"mine"})]


def test_a_member_larger_than_a_token_file_may_be_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """read_shard refuses a member past MAX_FILE_BYTES by its listed size, before reading it into memory."""
    tokens = token_folder(tmp_path / "tokens", ["a"])
    data = (tokens / "a.safetensors").read_bytes()
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.safetensors", data)
    monkeypatch.setattr(shards, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(TokenFileError, match=f"{len(data):,} bytes; a token file holds at most {len(data) - 1:,}"):
        list(read_shard(shard))
