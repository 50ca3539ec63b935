"""Videos inside uncompressed tar archives (WebDataset shards), read in place: the tokens of the same files unpacked,
named as a folder of the archive's name, and archives cut short, compressed or holding odd members said so."""

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from titok_fast import archives
from titok_fast.archives import list_archive, member_of
from titok_fast.cli import main
from titok_fast.containers import _bytes_of, cut_short
from titok_fast.manifest import MANIFEST_NAME, read_manifest
from titok_fast.pipeline import InputError, collect_inputs
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
    negative[last - 512 + 148 : last - 512 + 156] = b"        "
    negative[last - 512 + 148 : last - 512 + 156] = b"%06o\0 " % sum(negative[last - 512 : last])
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
    # pax and GNU headers, and bytes that are not a header: tarfile
    assert fast_used == [not long_names and case not in ("junk", "bad checksum", "negative size") for case in cases]
    names = list_archive(str(tmp_path / "whole.tar")).members
    split = form == tarfile.USTAR_FORMAT or long_names
    assert list(names) == [
        "b.mp4", "c/d.mp4", "e.mp4", "f/g.mp4", "a.mp4", *(["x" * 90 + "/" + "y" * 60 + ".mp4"] if split else []),
        *(["z" * 120 + ".mp4", "vidéo.mp4"] if long_names else []), "last.mp4",
    ]  # fmt: skip
    assert names["a.mp4"][1] == 7 and whole[names["last.mp4"][0] : names["last.mp4"][0] + 700] == b"w" * 700
