"""Videos inside uncompressed tar archives (WebDataset shards), read in place: the tokens of the same files unpacked,
named as a folder of the archive's name, and archives cut short, compressed or holding odd members said so."""

import gzip
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import av
import pytest
import torch
from test_shards import add, token_folder

from titok_fast import archives
from titok_fast.archives import ArchiveError, list_archive, member_of, read_member
from titok_fast.cli import main
from titok_fast.containers import _bytes_of, cut_short
from titok_fast.manifest import MANIFEST_NAME, read_manifest
from titok_fast.pipeline import InputError, collect_inputs, collect_token_files, input_pairs
from titok_fast.shards import pack_tokens
from titok_fast.tokens import load_tokens
from titok_fast.video import VideoError, read_clips, source_stamp

from videos import make_scrambled, make_truncated, make_video

GRID = ["--grid", "4x32x32", "--tokens", "8", "--fps", "8"]
RANDOM = ["--random-weights", "0", "--config", "tiny", "--device", "cpu"]


def pack(archive: Path, members: dict[str, Path | bytes], json_beside: bool = True) -> Path:
    """A tar archive of ``members`` (name -> a file's path, or bytes), each video with a small JSON beside it, as
    video2dataset's WebDataset shards hold."""
    with tarfile.open(archive, "w") as tar:
        for name, what in members.items():
            data = what if isinstance(what, bytes) else Path(what).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if json_beside:
                note = json.dumps({"key": name}).encode()
                info = tarfile.TarInfo(os.path.splitext(name)[0] + ".json")
                info.size = len(note)
                tar.addfile(info, io.BytesIO(note))
    return archive


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("unpacked")
    (root / "sub").mkdir()
    make_video(root / "000001.mp4", frames=30, height=48, width=64, fps=24)
    make_video(root / "sub" / "000002.mkv", frames=12, height=37, width=53, fps=12)  # FFV1 in Matroska
    make_video(root / "000003.mp4", frames=20, height=32, width=32, vfr=True)
    make_video(root / "000004.mp4", frames=16, height=32, width=48, fps=8)
    make_scrambled(root / "000005.mp4", root / "000001.mp4")
    return root


def run(*args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def indices(path: Path) -> list[torch.Tensor]:
    return load_tokens(path).all_indices()


def test_an_archives_videos_give_the_tokens_of_the_same_files_unpacked(unpacked, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    pack(shards / "00000.tar", {n: unpacked / n for n in ("000001.mp4", "sub/000002.mkv", "000003.mp4", "000005.mp4")})
    pack(shards / "00001.tar", {"000004.mp4": unpacked / "000004.mp4"})
    shutil.copy(unpacked / "000004.mp4", shards / "loose.mp4")  # a plain video beside the archives
    out, plain = tmp_path / "tokens", tmp_path / "plain"
    code, stdout, _ = run("encode", shards, "-o", out, *GRID, *RANDOM, capsys=capsys)
    assert code == 1 and "encoded 5 file(s)" in stdout, stdout  # the scrambled member fails alone
    assert "FAILED" in stdout and "00000.tar/000005.mp4: decoding failed" in stdout
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert names == ["00000/000001.safetensors", "00000/000003.safetensors", "00000/sub/000002.safetensors",
                     "00001/000004.safetensors", "loose.safetensors"]  # fmt: skip
    run("encode", unpacked, "-o", plain, *GRID, *RANDOM, capsys=capsys)
    for name in ("000001", "sub/000002", "000003"):
        assert all(map(torch.equal, indices(out / "00000" / f"{name}.safetensors"),
                       indices(plain / f"{name}.safetensors")))  # fmt: skip
    assert all(map(torch.equal, indices(out / "00001" / "000004.safetensors"), indices(plain / "000004.safetensors")))
    member = out / "00000" / "000001.safetensors"
    assert load_tokens(member).source == str(shards / "00000.tar" / "000001.mp4")
    sources = {row["source"] for row in read_manifest(out / MANIFEST_NAME)}
    assert str(shards / "00000.tar" / "sub" / "000002.mkv") in sources and len(sources) == 6

    code, stdout, _ = run("encode", shards, "-o", out, *GRID, *RANDOM, capsys=capsys)  # a resume
    assert "encoded 0 file(s)" in stdout and "skipped 5 already complete" in stdout and code == 1

    stamp = os.stat(shards / "00001.tar").st_mtime_ns
    os.utime(shards / "00001.tar", ns=(stamp + 10**9, stamp + 10**9))  # rewritten: its files are made again
    code, stdout, _ = run("encode", shards, "-o", out, *GRID, *RANDOM, capsys=capsys)
    assert "encoded 1 file(s)" in stdout and "skipped 4 already complete" in stdout, stdout

    code, stdout, _ = run("decode", out, "-o", tmp_path / "recon", "--side-by-side", capsys=capsys)
    assert code == 0 and "decoded 5 file(s)" in stdout, stdout  # the sources read again from the archives
    assert (tmp_path / "recon" / "00000" / "sub" / "000002.mp4").is_file()


def test_archives_and_members_are_named_as_folders_and_files_wherever_they_are_named(unpacked, tmp_path):
    (tmp_path / "d").mkdir()
    archive = pack(tmp_path / "d" / "shard.tar", {"a/x.mp4": unpacked / "000004.mp4", "y.mp4": unpacked / "000004.mp4"})
    listing, members = tmp_path / "list.txt", tmp_path / "members.txt"
    listing.write_text("d/shard.tar\n")
    members.write_text("d/shard.tar/a/x.mp4\n")

    def named(*inputs, list_names="stem"):
        return sorted(name for _, name in collect_inputs(list(inputs), list_names=list_names))

    assert named(archive) == ["shard/a/x", "shard/y"]  # on the command line: a folder of its name
    assert named(listing) == ["shard/a/x", "shard/y"]
    assert named(listing, list_names="relative") == ["d/shard/a/x", "d/shard/y"]
    assert named(tmp_path) == ["d/shard/a/x", "d/shard/y"]  # found in a folder
    assert named(archive / "a" / "x.mp4") == ["x"]  # a member by its path through the archive: a file
    assert named(members) == ["x"] and named(members, list_names="relative") == ["d/shard/a/x"]  # (as the archive's)
    pairs = collect_inputs([archive / "a" / "x.mp4", archive])  # reached twice: encoded once, as first named
    assert sorted(name for _, name in pairs) == ["shard/y", "x"]
    with pytest.raises(InputError, match=r"input '.*shard.tar/a/z.mp4': no file 'a/z.mp4' in the archive .*shard.tar"):
        collect_inputs([archive / "a" / "z.mp4"])  # not there: refused up front, as a missing file is
    escape = tmp_path / "escape.txt"  # a member's path out of its archive: its output name led out of the output
    escape.write_text("d/shard.tar/y.mp4\nd/shard.tar/../../../victim/x.mp4\n")  # folder (written, moved, removed)
    assert named(escape) == ["x", "y"]  # (by its stem, it would fail alone: no such member)
    with pytest.raises(InputError, match=r"^list '.*escape.txt' names '.*d/shard.tar/\.\./\.\./\.\./victim/x\.mp4', a "
                                         r"path out of the archive '.*shard.tar'; expected the path of a file inside"):
        named(escape, list_names="relative")
    for name in ("../x", "a/../../x", "/abs/x"):  # whatever names a caller gives: never out of the output folder
        with pytest.raises(InputError, match=r"^.*y.mp4: its output name '.*\.safetensors' leads out of the output "
                                             r"folder; expected a path below it$"):  # fmt: skip
            input_pairs([(archive / "y.mp4", name)])
    assert input_pairs([(archive / "y.mp4", "a/..")]) == [(archive / "y.mp4", "a/..")]  # "a/...safetensors"
    with pytest.raises(InputError, match=r"leads out of the output folder"):  # (pack's, from the API)
        pack_tokens([(archive / "y.safetensors", "../e/y")], tmp_path / "shards")
    assert not (tmp_path / "e.tar").exists() and not (tmp_path / "shards").exists()
    # the member's path reads as the file unpacked
    assert torch.equal(torch.stack(read_clips(archive / "y.mp4", frames=4, height=32, width=32, fps=8).clips),
                       torch.stack(read_clips(unpacked / "000004.mp4", frames=4, height=32, width=32, fps=8).clips))
    assert source_stamp(archive / "y.mp4") == f"{(unpacked / '000004.mp4').stat().st_size}:{archive.stat().st_mtime_ns}"
    assert source_stamp(archive / "z.mp4") == ""  # no such member


def test_a_member_cut_short_is_found_by_its_own_bytes_not_the_archives_after_it(unpacked, tmp_path):
    cut = make_truncated(tmp_path / "cut.mp4", unpacked / "000001.mp4")
    archive = pack(tmp_path / "s.tar", {"cut.mp4": cut, "after.mp4": unpacked / "000001.mp4"})
    said = cut_short(str(cut), cut.stat().st_size)
    assert said is not None and cut_short(str(archive / "cut.mp4"), cut.stat().st_size) == said
    with pytest.raises(VideoError, match=r"s\.tar/cut\.mp4: is cut short"):
        read_clips(archive / "cut.mp4", frames=4, height=32, width=32, fps=8)
    member = member_of(archive / "cut.mp4")
    with _bytes_of(str(archive / "cut.mp4")) as span:  # never past the member's end
        assert span.pread(100, member.size - 10) == cut.read_bytes()[-10:]
        assert span.pread(100, member.size) == b""


def test_an_archive_cut_short_gives_its_videos_before_the_cut_and_is_counted_left_out(unpacked, tmp_path, capsys):
    whole = pack(tmp_path / "whole.tar", {"a.mp4": unpacked / "000001.mp4", "b.mp4": unpacked / "000003.mp4"},
                 json_beside=False)  # fmt: skip
    b = list_archive(str(whole)).members["b.mp4"]
    data = whole.read_bytes()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "inside.tar").write_bytes(data[: b[0] + b[1] // 2])  # cut inside b's bytes
    (shards / "between.tar").write_bytes(data[: b[0] - 512])  # cut after a's bytes: b's header and the end gone
    end = b[0] + -(-b[1] // 512) * 512  # where the members end (then the end-of-archive blocks)
    (shards / "junk.tar").write_bytes(data[:end] + b"x" * 1024)
    code, stdout, stderr = run("encode", shards, "-o", tmp_path / "tokens", *GRID, *RANDOM, capsys=capsys)
    assert code == 1 and "encoded 4 file(s)" in stdout, stdout  # a.mp4 of each, and junk.tar's b.mp4
    assert "inside.tar/b.mp4: is cut short (an unfinished download or copy?): its archive ends at byte" in stdout
    assert f"LEFT OUT {shards / 'between.tar'}: cut short: it ends at byte {b[0] - 512:,} without the " in stdout
    assert "; the files past the cut were not encoded" in stdout
    assert f"LEFT OUT {shards / 'inside.tar'}: cut short: it ends at byte" in stdout
    assert f"LEFT OUT {shards / 'junk.tar'}: cut short: bytes that are not a tar header follow its members at " \
           f"byte {end:,}" in stdout  # fmt: skip
    assert "between.tar: cut short" in stderr  # said as it is found, too
    assert sorted(str(p.relative_to(tmp_path / "tokens")) for p in (tmp_path / "tokens").rglob("*.safetensors")) == [
        "between/a.safetensors", "inside/a.safetensors", "junk/a.safetensors", "junk/b.safetensors"]  # fmt: skip


def test_archives_that_cannot_be_read_in_place_are_left_out_or_refused_in_one_line(unpacked, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    data = pack(tmp_path / "s.tar", {"a.mp4": unpacked / "000004.mp4"}).read_bytes()
    (shards / "zipped.tar").write_bytes(gzip.compress(data))
    (shards / "text.tar").write_bytes(b"not an archive\n" * 100)
    pack(shards / "good.tar", {"a.mp4": unpacked / "000004.mp4"})
    code, stdout, _ = run("encode", shards, "-o", tmp_path / "tokens", *GRID, *RANDOM, capsys=capsys)
    assert code == 1 and "encoded 1 file(s)" in stdout
    assert (f"LEFT OUT {shards / 'zipped.tar'}: a gzip-compressed archive, which cannot be read in place; expected an "
            "uncompressed tar archive (decompress it first); the files in it were not encoded") in stdout
    assert f"LEFT OUT {shards / 'text.tar'}: not a tar archive (invalid header)" in stdout
    code, _, stderr = run("encode", shards / "zipped.tar", "-o", tmp_path / "t2", *GRID, *RANDOM, capsys=capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"input {str(shards / 'zipped.tar')!r}: a gzip-compressed archive" in stderr and "Traceback" not in stderr


def test_members_that_are_links_or_named_outside_the_archive_are_left_out_with_a_notice(unpacked, tmp_path, capsys):
    archive = tmp_path / "odd.tar"
    video = (unpacked / "000004.mp4").read_bytes()
    with tarfile.open(archive, "w") as tar:
        for name in ("../escape.mp4", "/abs.mp4", "good.mp4", "again.mp4"):
            info = tarfile.TarInfo(name)
            info.size = len(video)
            tar.addfile(info, io.BytesIO(video))
        link = tarfile.TarInfo("link.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        info = tarfile.TarInfo("again.mp4")  # a name written again: the later one is the file
        info.size = 5
        tar.addfile(info, io.BytesIO(b"short"))
    pairs = collect_inputs([archive])
    err = capsys.readouterr().err
    assert sorted(name for _, name in pairs) == ["odd/again", "odd/good"]
    assert "member '../escape.mp4' is named outside the archive; left out" in err
    assert "member '/abs.mp4' is named outside the archive; left out" in err
    assert "member 'link.mp4' is not a regular file (a link or device); left out" in err
    assert member_of(archive / "again.mp4").size == 5
    with pytest.raises(VideoError, match="link.mp4: .*not a regular file"):
        read_clips(archive / "link.mp4", frames=4, height=32, width=32, fps=8)
    with pytest.raises(VideoError, match="no file '../escape.mp4' in the archive|named outside the archive"):
        read_clips(Path(f"{archive}/../escape.mp4"), frames=4, height=32, width=32, fps=8)


def odd_archive(path: Path, form: int, long_names: bool) -> Path:
    """An archive of every kind of member tarfile writes in format ``form``: files of sizes around a block, folders
    (also as an old V7 tar writes them: a regular file whose name ends in /), links, a device, names to normalise,
    outside the archive, written twice, and (``long_names``) past 100 bytes and not ASCII."""
    entries = [("a.mp4", 0), ("b.mp4", 1), ("c/d.mp4", 511), ("./e.mp4", 512), ("f//g.mp4", 513), ("a.mp4", 7),
               ("../out.mp4", 3), ("/abs.mp4", 3)]  # fmt: skip
    if form == tarfile.USTAR_FORMAT or long_names:  # (ustar splits it in two fields; GNU and pax add a header)
        entries.append(("x" * 90 + "/" + "y" * 60 + ".mp4", 5))
    if long_names:
        entries += [("z" * 120 + ".mp4", 9), ("vidéo.mp4", 4)]
    with tarfile.open(path, "w", format=form) as tar:
        for name, size in entries:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"v" * size))
        for name, kind in (("dir", tarfile.DIRTYPE), ("sym.mp4", tarfile.SYMTYPE), ("hard.mp4", tarfile.LNKTYPE),
                           ("fifo.mp4", tarfile.FIFOTYPE), ("dev.mp4", tarfile.CHRTYPE), ("v7dir/", tarfile.AREGTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "b.mp4" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
        info = tarfile.TarInfo("last.mp4")
        info.size = 700
        tar.addfile(info, io.BytesIO(b"w" * 700))
    return path


@pytest.mark.parametrize(("form", "long_names"), [(tarfile.USTAR_FORMAT, False), (tarfile.GNU_FORMAT, False),
                                                  (tarfile.GNU_FORMAT, True), (tarfile.PAX_FORMAT, False),
                                                  (tarfile.PAX_FORMAT, True)])  # (ustar holds no long names)
def test_the_fast_listing_is_tarfiles_for_every_member_and_every_cut(form, long_names, tmp_path, monkeypatch):
    """Archives listed from their headers alone give tarfile's listing: the same members at the same bytes, the
    same left out and the same verdict on where the archive ends, whole, cut at every kind of place, or followed by
    bytes that are not headers; headers it does not read (GNU long names, pax) leave the archive to tarfile."""
    whole = odd_archive(tmp_path / "whole.tar", form, long_names).read_bytes()
    last = whole.rindex(b"w" * 700)
    corrupt, negative = bytearray(whole), bytearray(whole)
    corrupt[last - 512 + 148 : last - 512 + 156] = b"0000000\0"  # the last header's checksum, wrong
    negative[last - 512 + 124 : last - 512 + 136] = b"-0000002000\0"  # its size: 2 blocks back
    checksummed(negative, last - 512)
    cases = {"whole": whole, "inside": whole[: last + 100], "at a header": whole[: last - 512],
             "in a header": whole[: last - 300], "no end block": whole[: last + 1024], "junk": whole[: last + 1024] +
             b"j" * 1024, "bad checksum": bytes(corrupt), "negative size": bytes(negative)}  # fmt: skip
    fast_used = []
    for case, data in cases.items():
        path = tmp_path / f"{case}.tar"
        path.write_bytes(data)
        archives._listed.cache_clear()
        with open(path, "rb") as f:
            fast_used.append(archives._listed_fast(f.fileno(), len(data), archives._Listing()))
        fast = list_archive(str(path))
        archives._listed.cache_clear()
        monkeypatch.setattr(archives, "_listed_fast", lambda *_: False)
        slow = list_archive(str(path))
        monkeypatch.undo()
        assert fast == slow, case
        assert bool(fast.cut) == (case != "whole"), case
    # bytes that are not a header: tarfile
    assert fast_used == [case not in ("junk", "bad checksum", "negative size") for case in cases]
    names = list_archive(str(tmp_path / "whole.tar")).members
    split = form == tarfile.USTAR_FORMAT or long_names
    assert list(names) == [
        "b.mp4", "c/d.mp4", "e.mp4", "f/g.mp4", "a.mp4", *(["x" * 90 + "/" + "y" * 60 + ".mp4"] if split else []),
        *(["z" * 120 + ".mp4", "vidéo.mp4"] if long_names else []), "last.mp4",
    ]  # fmt: skip
    assert names["a.mp4"][1] == 7 and whole[names["last.mp4"][0] : names["last.mp4"][0] + 700] == b"w" * 700


def checksummed(data: bytearray, at: int = 0) -> bytearray:
    """``data`` with the checksum of its header at byte ``at`` made right again (after a change to its fields)."""
    data[at + 148 : at + 156] = b" " * 8
    data[at + 148 : at + 156] = b"%06o\0 " % sum(data[at : at + 512])
    return data


def test_crafted_sizes_and_names_end_the_listing_or_leave_a_member_out_never_the_run(unpacked, tmp_path, capsys):
    video = (unpacked / "000004.mp4").read_bytes()
    good = _file(b"ok.mp4", video)
    shards = tmp_path / "shards"
    shards.mkdir()
    base256 = bytes([0x80]) + (2**86).to_bytes(11, "big")  # a size past any offset
    (shards / "huge.tar").write_bytes(good + _ustar(b"big.mp4", base256) + video + b"\0" * 1024)
    (shards / "pax.tar").write_bytes(good + _ustar(b"././@PaxHeader", base256, b"x") + b"\0" * 1024)
    with open(shards / "sparse.tar", "wb") as f:  # a pax header of 4 GiB (a sparse file): not read into memory
        f.write(good + _ustar(b"././@PaxHeader", 1 << 32, b"x"))
        f.truncate(f.tell() + (1 << 32) + 1024)
    with tarfile.open(shards / "nul.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in (("a.mp4", "a.mp4"), ("b.mp4", "a\0b.mp4")):  # a pax path may hold a NUL byte
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(video), {"path": path}
            tar.addfile(info, io.BytesIO(video))
    code, stdout, _ = run("encode", shards, "-o", tmp_path / "tokens", *GRID, *RANDOM, capsys=capsys)
    assert "encoded 4 file(s)" in stdout and "Traceback" not in stdout, stdout  # each ok.mp4, and nul.tar's a.mp4
    assert f"LEFT OUT {shards / 'huge.tar'}: cut short" in stdout and f"LEFT OUT {shards / 'pax.tar'}: cut" in stdout
    assert member_of(shards / "sparse.tar" / "ok.mp4").size == len(video) and code == 1


def test_a_name_written_again_as_a_link_is_the_link_and_a_resume_through_a_link_keeps_the_tokens(unpacked, tmp_path,
                                                                                                 capsys):  # fmt: skip
    archive = tmp_path / "real" / "s.tar"
    archive.parent.mkdir()
    pack(archive, {"x.mp4": unpacked / "000004.mp4", "y.mp4": unpacked / "000004.mp4"})
    with tarfile.open(archive, "a") as tar:
        link = tarfile.TarInfo("y.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "x.mp4"
        tar.addfile(link)
    assert list(list_archive(str(archive)).members) == ["x.mp4", "x.json", "y.json"]  # as tar extracts it
    (tmp_path / "link").symlink_to("real")
    out = tmp_path / "tokens"
    run("encode", tmp_path / "real", "-o", out, *GRID, *RANDOM, capsys=capsys)
    code, stdout, _ = run("encode", tmp_path / "link", "-o", out, *GRID, *RANDOM, capsys=capsys)
    assert code == 0 and "encoded 0 file(s)" in stdout and "skipped 1 already complete" in stdout, stdout


def test_the_fast_listing_ends_where_tarfile_finds_a_number_field_that_is_not_one(tmp_path):
    whole = odd_archive(tmp_path / "whole.tar", tarfile.USTAR_FORMAT, False).read_bytes()
    at = whole.index(b"c/d.mp4")
    data = bytearray(whole)
    data[at + 136 : at + 148] = b"1234567890x\0"  # its mtime
    checksummed(data, at)
    (tmp_path / "odd.tar").write_bytes(data)
    fast = list_archive(str(tmp_path / "odd.tar"))
    archives._listed.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(archives, "_listed_fast", lambda *_: False)
        assert list_archive(str(tmp_path / "odd.tar")) == fast and "bytes that are not a tar header" in fast.cut


def fuzzed_archives(form: int, trials: int, seed: int):
    """Archives of every member kind in format ``form`` (pax: a header before every member, as a WebDataset shard
    written by Python's tarfile with float times has), each with a few bytes of its headers (names, sizes, types,
    numbers, pax records) changed, most with their checksums made right again, some cut short."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=form) as tar:
        for name, size in (("a.mp4", 0), ("d/", -1), ("b.mp4", 700), ("c/x.mp4", 512), ("l.mp4", -2),
                           ("p" * 60 + "/" + "n" * 45 + ".mp4", 3), ("e.mp4", 1)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.mtime = 1.5e9 + 0.25  # (a float: Python writes a pax header for it)
            if size == -1:
                info.type = tarfile.DIRTYPE
            elif size == -2:
                info.type, info.linkname = tarfile.SYMTYPE, "a.mp4"
            else:
                info.size = size
            tar.addfile(info, io.BytesIO(b"v" * max(size, 0)))
    base = buf.getvalue()
    heads = [k for k in range(0, len(base), 512) if _checksum_holds_here(base[k : k + 512])]
    fields = [(0, 100), (124, 136), (156, 157), (345, 500), (257, 265), (157, 257), (100, 108), (136, 148),
              (329, 337), (512, 600)]  # (the last: the first bytes after a header, a pax header's records)  # fmt: skip
    alphabet = b"0123456789 \0/.x-+_=\n\x80\xffLKSg7abc"
    for _ in range(trials):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            head = rng.choice(heads)
            start, end = rng.choice(fields)
            at = rng.randrange(start, end)
            for j in range(rng.randint(1, 4)):
                if at + j < end and head + at + j < len(data):
                    data[head + at + j] = rng.choice(alphabet)
            if rng.random() < 0.9:
                checksummed(data, head)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        yield bytes(data)


def _checksum_holds_here(header: bytes) -> bool:
    try:
        return len(header) == 512 and header.count(0) < 512 and archives._checksum_holds(header, archives._octal(
            header[148:156]))  # fmt: skip
    except ValueError:
        return False


def listed_both_ways(path: Path, monkeypatch) -> list:
    """The archive at ``path`` listed by the fast listing (tarfile where it gives up) and by tarfile alone: each a
    Listing, or the error it raised."""
    found = []
    for fast in (True, False):
        archives._listed.cache_clear()
        with monkeypatch.context() as patch:
            if not fast:
                patch.setattr(archives, "_listed_fast", lambda *_: False)
            try:
                found.append(list_archive(str(path)))
            except OSError as e:
                found.append(f"{type(e).__name__}: {e}")
    archives._listed.cache_clear()
    return found


@pytest.mark.parametrize("form", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_damaged_headers_are_listed_as_tarfile_lists_them(form, tmp_path, monkeypatch):
    path = tmp_path / "fuzzed.tar"
    for k, data in enumerate(fuzzed_archives(form, 400, seed=form)):
        path.write_bytes(data)
        fast, slow = listed_both_ways(path, monkeypatch)
        assert fast == slow, (k, data)


def test_webdataset_shards_with_a_pax_header_before_every_member_are_listed_without_tarfile(unpacked, tmp_path):
    """webdataset's TarWriter (video2dataset's) writes with Python's default pax format and float times: a pax header
    before every member. The fast listing reads those headers, and their paths and sizes, itself."""
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w|") as tar:  # (as TarWriter opens it: a stream)
        for key in range(3):
            for ext, data in ((".mp4", (unpacked / "000004.mp4").read_bytes()), (".json", b"{}"), (".txt", b"a")):
                info = tarfile.TarInfo(f"{key:09d}{ext}")
                info.size, info.mtime, info.mode = len(data), 1.7e9 + 0.123, 0o444
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("x" * 150 + "/é.mp4")  # a long, non-ASCII name: in the pax header's path
        info.size, info.pax_headers = 4, {"size": "4", "comment": "any"}
        tar.addfile(info, io.BytesIO(b"abcd"))
    assert path.read_bytes()[156:157] == b"x"  # (a pax header first)
    with open(path, "rb") as f:
        listing = archives._Listing()
        assert archives._listed_fast(f.fileno(), path.stat().st_size, listing)
    names = list(listing.done().members)
    assert names[:3] == ["000000000.mp4", "000000000.json", "000000000.txt"] and len(names) == 10
    offset, size = listing.members["x" * 150 + "/é.mp4"]
    assert size == 4 and path.read_bytes()[offset : offset + 4] == b"abcd"
    assert listing.done() == listed_both_ways(path, pytest.MonkeyPatch())[1]


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("form", ["gnu", "posix", "oldgnu"])
def test_gnu_tars_sparse_files_and_long_names_are_left_out_or_listed_as_tarfile_does(form, tmp_path, monkeypatch):
    """GNU tar's own archives: sparse files (old GNU 'S' headers with extension blocks, or pax sparse maps) are left
    out without their maps being read, and the members after them listed at the same bytes as tarfile finds them."""
    folder = tmp_path / "in"
    (folder / ("d" * 120)).mkdir(parents=True)
    (folder / ("d" * 120) / ("long" * 30 + ".mp4")).write_bytes(b"x" * 1000)
    with open(folder / "holes.mp4", "wb") as f:  # many holes: an old GNU header holds 4, then extension blocks
        for k in range(40):
            f.seek(k * 65536)
            f.write(b"data")
    (folder / "z.mp4").write_bytes(b"z" * 600)
    path = tmp_path / "gnu.tar"
    subprocess.run(["tar", f"--format={form}", "--sparse", "-cf", str(path), "-C", str(folder), "."], check=True)
    fast, slow = listed_both_ways(path, monkeypatch)
    assert fast == slow
    assert sorted(fast.members) == ["d" * 120 + "/" + "long" * 30 + ".mp4", "z.mp4"]
    assert [name for name, why in fast.left_out if "sparse" in why] == ["holes.mp4"]
    with open(path, "rb") as f:
        assert archives._listed_fast(f.fileno(), path.stat().st_size, archives._Listing())


def _ustar(name: bytes, size: int | bytes = 0, kind: bytes = b"0", extra: dict | None = None) -> bytes:
    """A ustar header with its checksum; ``extra``: bytes put at offsets of it first."""
    header = bytearray(512)
    header[: len(name)], header[156:157], header[257:265] = name, kind, b"ustar\x0000"
    header[100:108], header[108:116], header[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    header[124:136] = size if isinstance(size, bytes) else b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    for at, value in (extra or {}).items():
        header[at : at + len(value)] = value
    return bytes(checksummed(header))


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _pax_header(records: bytes) -> bytes:
    return _ustar(b"././@PaxHeader", len(records), b"x") + _padded(records)


def _file(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return _ustar(name, len(data), kind) + _padded(data)


OK, AFTER, END = _file(b"ok.mp4", b"x"), _file(b"after.mp4", b"y"), b"\0" * 1024
VERSION_1 = _record(b"GNU.sparse.major", b"1") + _record(b"GNU.sparse.minor", b"0")
CRAFTED = {
    "a V7 folder with a size": OK + _file(b"d/", b"\0" * 512, b"\0") + AFTER + END,
    "an old GNU sparse header whose extension block is missing": OK + _ustar(b"s.mp4", 0, b"S", {482: b"\1"}),
    "400 pax headers in a row": OK + _pax_header(_record(b"comment", b"a")) * 400 + AFTER + END,
    "an old GNU sparse header of a negative size": OK + _ustar(b"s.mp4", 0, b"S", {483: b"\xff" * 12}) + AFTER + END,
    "an empty sparse map": OK + _pax_header(_record(b"GNU.sparse.map", b"")) + _file(b"s.mp4", b"y") + AFTER + END,
    "a negative sparse size": OK + _pax_header(_record(b"GNU.sparse.size", b"-5")) + _file(b"s.mp4", b"y") + AFTER
    + END,
    "a sparse 1.0 map that is not numbers": OK + _pax_header(VERSION_1) + _file(b"s.mp4", b"garbage") + AFTER + END,
    "a charset inside another record": OK + _pax_header(_record(b"comment", b"1 hdrcharset=\xff")) + AFTER + END,
    "a path that is not UTF-8": OK + _pax_header(_record(b"path", b"\xc3\xa9\xff.mp4")) + AFTER + END,
    "records that do not parse, at length": OK + _pax_header(b"3 a" * 48_000 + b"=\n") + AFTER + END,
    "a long run of digits": OK + _pax_header(b"1" * 20_000) + AFTER + END,
    "a long run of digits in a record": OK + _pax_header(_record(b"path", b"7" * 20_000 + b".mp4")) + AFTER + END,
}  # fmt: skip


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_headers_are_listed_as_tarfile_lists_them_and_raise_nothing_else(case, tmp_path, monkeypatch):
    """Headers a review crafted where the two listings differed, or where tarfile raised an IndexError or a
    RecursionError past list_archive, or parsed for seconds and gigabytes (pax records that do not parse, long runs of
    digits: quadratic in Python's tarfile before 3.13): the same listing both ways, or the same OSError."""
    path = tmp_path / "crafted.tar"
    path.write_bytes(CRAFTED[case])
    fast, slow = listed_both_ways(path, monkeypatch)
    assert fast == slow
    assert isinstance(fast, str) or "ok.mp4" in fast.members  # (what comes before is listed)


def test_libav_reads_a_members_span_and_not_a_byte_past_it(tmp_path):
    """libav reads a member's span exactly: FFmpeg's subfile "end" is exclusive, and a byte past it (padding, or the
    next header's first byte) would be read as the video's last."""
    archive = pack(tmp_path / "a.tar", {"a.bin": b"A" * 1024, "b.bin": b"B" * 1000}, json_beside=False)
    for name, data in (("a.bin", b"A" * 1024), ("b.bin", b"B" * 1000)):
        member = member_of(f"{archive}/{name}")
        with av.open(member.libav_url, format="data") as container:
            assert b"".join(bytes(packet) for packet in container.demux()) == data


def test_an_archive_named_in_capitals_is_an_archive(tmp_path):
    """``00000.TAR`` is an archive (ARCHIVE_EXTENSIONS are in any case): its token files are found."""
    assert archives.is_archive("x/00000.TAR") and archives.is_archive("x/00000.Tar")
    tokens = token_folder(tmp_path / "tokens", ["1", "2"])
    pack_tokens(collect_token_files([tokens]), tmp_path / "shards")
    os.replace(tmp_path / "shards" / "00000.tar", tmp_path / "shards" / "00000.TAR")
    assert [name for _, name in collect_token_files([tmp_path / "shards"])] == ["00000/1", "00000/2"]


def test_a_member_cut_short_after_its_listing_is_said_cut_not_read_short(tmp_path):
    """An archive truncated in place after it was listed (the same inode: a copy still under way, a truncating
    writer) is said cut short, not read as the member's first bytes."""
    archive = pack(tmp_path / "a.tar", {"caption.txt": b"x" * 1000}, json_beside=False)
    member = member_of(f"{archive}/caption.txt")
    os.truncate(archive, member.offset + 10)
    with pytest.raises(ArchiveError, match="cut short"):
        read_member(member)


@pytest.mark.parametrize("name", [".", ".."])
def test_a_member_named_dot_or_dot_dot_is_left_out(tmp_path, name):
    """A crafted archive's regular file named ".." (or ".") is left out: ``x.tar/..`` names no member."""
    archive = pack(tmp_path / "a.tar", {name: b"data", "ok.txt": b"ok"}, json_beside=False)
    listing = list_archive(str(archive))
    assert list(listing.members) == ["ok.txt"] and [n for n, _ in listing.left_out] == [name]


def _set_size_field(block: bytearray, size: int) -> None:
    block[124:136] = b"%011o\0" % size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def test_a_pax_size_record_is_the_members_size_as_tarfile_reads_it(tmp_path):
    """A pax "size" record (how a member past 8 GiB is sized in a pax archive: a WebDataset shard of long videos)
    sizes the member over the ustar size field, in the fast listing as in tarfile."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size, info.pax_headers = 1000, {"size": "1000"}
        tar.addfile(info, io.BytesIO(b"x" * 1000))
        info = tarfile.TarInfo("after.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"after"))
    data = bytearray(buffer.getvalue())
    header = bytearray(data[1024:1536])  # (the pax header and its one block of records, then big.bin's header)
    assert header[:7] == b"big.bin"
    _set_size_field(header, 0)  # the ustar field says 0; the record says 1000
    data[1024:1536] = header
    (tmp_path / "a.tar").write_bytes(data)
    with tarfile.open(tmp_path / "a.tar") as tar:
        expected = {i.name: (i.offset_data, i.size) for i in tar.getmembers()}
    assert expected["big.bin"][1] == 1000
    assert list_archive(str(tmp_path / "a.tar")).members == expected


def test_a_member_of_an_archive_named_in_capitals_is_read_in_place(tmp_path):
    """``X.TAR/clip.txt`` names a member (a token file's source, a path on a list), read in place."""
    archive = pack(tmp_path / "X.TAR", {"clip.txt": b"caption"}, json_beside=False)
    member = member_of(f"{archive}/clip.txt")
    assert member is not None and read_member(member) == b"caption"


def test_member_bytes_refuses_a_member_past_its_limit(tmp_path):
    """member_bytes reads a member up to its limit (MAX_FILE_BYTES for a token file, MAX_BESIDE_BYTES for a caption)
    and refuses one past it unread."""
    archive = pack(tmp_path / "a.tar", {"m.txt": b"x" * 100}, json_beside=False)
    assert archives.member_bytes(f"{archive}/m.txt", 100, "a test file") == b"x" * 100
    with pytest.raises(ValueError, match="100 bytes; a test file holds at most 99"):
        archives.member_bytes(f"{archive}/m.txt", 99, "a test file")


def test_pax_records_of_a_long_run_of_digits_are_refused_unparsed(tmp_path):
    """Python's tarfile before 3.13 parses a run of digits in a pax header in time quadratic in its length (a
    crafted megabyte of them: minutes). Pax data over a block holding 64 digits in a row is refused, by the fast
    listing and by tarfile's alike, before tarfile parses it; a long name of fewer digits in a row is listed."""
    for name, refused in (("1" * 600 + ".mp4", True), ("1234567890/" * 60 + "x.mp4", False)):
        with tarfile.open(tmp_path / "a.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            add(tar, name, b"abc")
            add(tar, "ok.txt", b"ok")
        if refused:
            with pytest.raises(ArchiveError, match=r"a pax header whose records do not parse"):
                list_archive(str(tmp_path / "a.tar"))
        else:
            assert list(list_archive(str(tmp_path / "a.tar")).members) == [name, "ok.txt"]
