"""Weights by name through a Hugging Face cache built here (no network): resolution, conversion cache, offline.

Commands run as subprocesses: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from test_loading import lightning_checkpoint

from titok_fast import PRESETS
from titok_fast.cli import main
from titok_fast.hub import DEFAULT_FILE, V1_REPO, HubRef, parse_hub_ref
from titok_fast.loading import load_tokenizer
from titok_fast.tokens import load_tokens

from helpers import make_model
from videos import make_video

REPO = "someone/tiny-titok"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GRID = ["--grid", "4x32x32", "--tokens", "8", "--fps", "8", "--device", "cpu"]


def hub_cache(home, repo_id: str, files: dict) -> None:
    """The standard cache layout under `home`: hub/models--owner--name/{refs/main, blobs/<sha256>,
    snapshots/<commit>/<file> -> ../../blobs/<sha256>}, as `hf download` leaves it (a file in a sub-folder of the
    repository, "sub/model.ckpt", in that sub-folder of the snapshot, linked to the blob from there)."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


@pytest.fixture
def hub_library(tmp_path, monkeypatch):
    """huggingface_hub, in this process, offline with its cache, token and stored tokens under tmp_path / "hf" (where
    hub_cache(tmp_path / "hf", ...) builds a cache): it reads its settings as it is imported, and download() asks
    its constants at every call."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    for name, value in [("HF_HUB_CACHE", home / "hub"), ("HF_TOKEN_PATH", home / "token"),
                        ("HF_STORED_TOKENS_PATH", home / "stored_tokens"), ("HF_HUB_OFFLINE", True)]:  # fmt: skip
        monkeypatch.setattr(constants, name, str(value) if isinstance(value, os.PathLike) else value)
    return home


def environment(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TITOK_FAST_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TITOK_FAST_CACHE=str(tmp_path / "converted"))
    env.update(extra)
    return env


def cli(env, *args, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "titok_fast.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding REPO with a tiny upstream-style Lightning checkpoint (EMA weights), and a short video."""
    root = tmp_path_factory.mktemp("hub")
    lightning_checkpoint(root / "model.ckpt", make_model("tiny"))
    hub_cache(root / "hf", REPO, {DEFAULT_FILE: root / "model.ckpt"})
    make_video(root / "clip.mp4", frames=16, height=32, width=48, fps=8)
    return root


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("owner/name", HubRef("owner/name")),
        ("owner/name@v1.0", HubRef("owner/name", "v1.0")),
        ("owner/name:weights/ema.ckpt", HubRef("owner/name", None, "weights/ema.ckpt")),
        ("hf://owner/name@refs/pr/3:x.safetensors", HubRef("owner/name", "refs/pr/3", "x.safetensors")),
        (V1_REPO, HubRef(V1_REPO)),
        ("checkpoints/model.ckpt", None),  # looks like owner/name but ends like a weights file: a local path
        ("checkpoints/Model.SAFETENSORS", None),  # (the suffix in any case)
        ("model.ckpt", None),
        ("/abs/owner/name", None),
        ("owner/name:../../etc/passwd", None),
        ("owner/name:/etc/passwd", None),  # a file of the repository is named from its root, never an absolute path
        ("owner/name@../../../../tmp/secret", None),  # huggingface_hub would read refs/<revision> from its cache
        ("owner/name@refs/../x", None),
        ("owner/name@.hidden", None),
        ("owner/name@a//b", None),
    ],
)
def test_hub_references_are_told_apart_from_paths(text, expected):
    assert parse_hub_ref(text) == expected


def test_an_existing_local_path_wins_and_hf_scheme_is_strict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").write_bytes(b"")
    assert parse_hub_ref("owner/name") is None
    assert parse_hub_ref("hf://owner/name") == HubRef("owner/name")
    with pytest.raises(ValueError, match="not a Hub reference"):
        parse_hub_ref("hf://owner/name:../x")
    with pytest.raises(ValueError, match="not a Hub reference"):
        parse_hub_ref("hf://owner/name@../../../../tmp/secret:model.ckpt")
    with pytest.raises(ValueError, match="not a Hub reference"):
        parse_hub_ref("hf://owner/name:/etc/passwd")


def test_only_a_whole_commit_pins_a_hub_reference():
    """decode fetches the Hub file a stranger's token file names only when it is pinned to a commit: 40 hex digits
    and nothing more, since a longer name (a branch that starts with a commit's digits) moves."""
    from titok_fast.hub import is_pinned

    assert is_pinned(f"hf://{REPO}@{COMMIT}:model.ckpt") and is_pinned(f"hf://{REPO}@{COMMIT}:sub/w.safetensors")
    for text in (f"hf://{REPO}@{COMMIT}xyz:model.ckpt", f"hf://{REPO}@{COMMIT}0:model.ckpt",
                 f"hf://{REPO}@{COMMIT[:-1]}:model.ckpt", f"hf://{REPO}@main:model.ckpt", f"hf://{REPO}:model.ckpt",
                 f"{REPO}@{COMMIT}:model.ckpt"):  # fmt: skip
        assert not is_pinned(text), text


def test_an_unknown_repository_needs_a_config():
    with pytest.raises(ValueError, match=r"someone/unknown is not a known release .* --config \(someone/unknown is no "
                                         r"local file either\)$"):  # fmt: skip
        load_tokenizer("someone/unknown")


def test_a_local_path_typed_without_its_suffix_is_named_in_the_hub_error(tmp_path, monkeypatch):
    """``models/tiny`` reads as a Hub id; where ``models/tiny.safetensors`` is there, the error says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^models/tiny is not a known release .* \(models/tiny is no local file "
                                         r"either; did you mean models/tiny\.safetensors\?\)$"):  # fmt: skip
        load_tokenizer("models/tiny")
    with pytest.raises(ValueError, match=r"is not a known release .*--config$"):  # hf://: a Hub id, as meant
        load_tokenizer("hf://models/tiny")


def test_encode_by_id_converts_once_and_gives_the_tokens_of_the_local_file(hub, tmp_path, capsys):
    env = environment(tmp_path, HF_HOME=str(hub / "hf"))
    by_id = ["--checkpoint", REPO, "--config", "tiny", *GRID]
    first = cli(env, "encode", hub / "clip.mp4", "-o", tmp_path / "by-id", *by_id)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr
    converted = sorted((tmp_path / "converted").rglob("*"))
    again = cli(env, "encode", hub / "clip.mp4", "-o", tmp_path / "again", *by_id)
    assert again.returncode == 0 and "converting" not in again.stderr  # the cached conversion is loaded
    assert sorted((tmp_path / "converted").rglob("*")) == converted and len(converted) == 2  # folder + one file
    levels = tmp_path / "levels.yaml"  # the same weights with other FSQ levels: converted once all the same
    levels.write_text(yaml.safe_dump(dataclasses.replace(PRESETS["tiny"], fsq_levels=(8, 5, 5, 5, 5)).to_dict()))
    other = cli(env, "encode", hub / "clip.mp4", "-o", tmp_path / "levels", "--checkpoint", REPO, "--config", levels,
                *GRID)  # fmt: skip
    assert other.returncode == 0 and "converting" not in other.stderr, other.stderr
    assert sorted((tmp_path / "converted").rglob("*")) == converted
    assert load_tokens(tmp_path / "levels" / "clip.safetensors").model_config["tokenizer"]["model"]["fsq_levels"] == [
        8, 5, 5, 5, 5]  # fmt: skip
    assert main(["encode", str(hub / "clip.mp4"), "-o", str(tmp_path / "by-path"), "--checkpoint",
                 str(hub / "model.ckpt"), "--config", "tiny", *GRID]) == 0  # fmt: skip
    token_file = load_tokens(tmp_path / "by-id" / "clip.safetensors")
    by_path = load_tokens(tmp_path / "by-path" / "clip.safetensors")
    assert torch.equal(token_file.indices, by_path.indices) and token_file.weights_digest == by_path.weights_digest
    assert token_file.weights_source == f"hf://{REPO}@{COMMIT}:{DEFAULT_FILE}"

    decoded = cli(env, "decode", tmp_path / "by-id" / "clip.safetensors", "-o", tmp_path / "videos")
    assert decoded.returncode == 0 and "decoded 1 file(s)" in decoded.stdout, decoded.stderr


def test_decode_checks_the_recorded_digest_of_hub_weights(hub, tmp_path, monkeypatch, capsys):
    """The Hub reference a token file records is fetched (here: handed the cached file) and its digest compared."""
    import dataclasses

    from titok_fast import hub as hub_module
    from titok_fast.tokens import save_tokens

    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (hub / "model.ckpt", HubRef(REPO, COMMIT)))
    assert main(["encode", str(hub / "clip.mp4"), "-o", str(tmp_path), "--checkpoint", REPO, "--config", "tiny",
                 *GRID]) == 0  # fmt: skip
    token_file = load_tokens(tmp_path / "clip.safetensors")
    save_tokens(tmp_path / "other.safetensors", dataclasses.replace(token_file, weights_digest="0" * 16))
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "videos")]) == 2
    assert "the token files were made by 0000000000000000" in capsys.readouterr().err
    assert not (tmp_path / "videos").exists()


@pytest.mark.parametrize("source", [f"hf://{REPO}@main:model.ckpt", f"hf://{REPO}@../../../../etc/passwd:model.ckpt"])
def test_decode_takes_only_hub_weights_pinned_to_a_commit_from_a_token_file(hub, tmp_path, monkeypatch, capsys, source):
    """A token file is a stranger's: the Hub file it names is fetched only when pinned to a commit, as titok-fast
    records it, so it cannot make the Hub client read a branch's (or any other) file from the cache."""
    import dataclasses

    from titok_fast import hub as hub_module
    from titok_fast.tokens import save_tokens

    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (hub / "model.ckpt", HubRef(REPO, COMMIT)))
    assert main(["encode", str(hub / "clip.mp4"), "-o", str(tmp_path), "--checkpoint", REPO, "--config", "tiny",
                 *GRID]) == 0  # fmt: skip
    fetched = []
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: fetched.append(ref))
    token_file = load_tokens(tmp_path / "clip.safetensors")
    save_tokens(tmp_path / "other.safetensors", dataclasses.replace(token_file, weights_source=source))
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "videos")]) == 2
    err = capsys.readouterr().err
    assert "not a Hub file pinned to a commit" in err and len(err.strip().splitlines()) == 1, err
    assert fetched == [] and not (tmp_path / "videos").exists()


def test_two_processes_converting_at_once_leave_one_good_file(hub, tmp_path):
    env = environment(tmp_path, HF_HOME=str(hub / "hf"))
    load = (
        f"from titok_fast.loading import load_tokenizer; print(load_tokenizer({REPO!r}, config='tiny').weights_digest)"
    )
    runs = [subprocess.Popen([sys.executable, "-c", load], env=env, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    digests = {run.communicate(timeout=300)[0].strip() for run in runs}
    assert [run.returncode for run in runs] == [0, 0] and len(digests) == 1
    files = list((tmp_path / "converted").rglob("*.safetensors"))
    assert len(files) == 1 and not [p for p in files[0].parent.iterdir() if p.name.startswith(".")]
    assert load_tokenizer(files[0]).weights_digest == digests.pop()


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE=1", "unreachable Hub"])
def test_no_cached_weights_offline_is_one_line_exit_2_and_nothing_written(hub, tmp_path, offline):
    extra = {} if offline.startswith("HF_HUB") else {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = cli(environment(tmp_path, **extra), "encode", hub / "clip.mp4", "-o", tmp_path / "tokens", *GRID)
    assert done.returncode == 2
    assert (
        f"`hf download {V1_REPO} model.ckpt` on a connected machine" in done.stderr
        and done.stderr.rstrip().endswith("--checkpoint PATH)")  # (the release's id is no mistyped local path)
    )
    assert len(done.stderr.strip().splitlines()) == 2  # which weights are being fetched, then the error
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "converted").exists()


def test_the_demo_falls_back_to_random_weights_without_waiting(tmp_path):
    """Offline with no cache, the no-argument demo (what CI runs) completes with the random-weights notice."""
    done = cli(environment(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "hf download" in done.stderr and "falls back to RANDOM weights" in done.stderr
    assert "PSNR:" in done.stdout and "8x64x96, 128 tokens" in done.stdout
    assert (tmp_path / "titok-fast-demo" / "recon" / "sample.mp4").is_file()


def test_the_demo_with_weights_named_that_cannot_be_had_is_an_error_and_writes_nothing(tmp_path):
    """Only the default weights fall back to random ones: weights the user named that are not there are an
    error (exit 2), not silently swapped, and a demo refused for its options leaves no sample behind."""
    for options in (["--checkpoint", "someone/other-model", "--config", "tiny"], ["--device", "cuda"]):
        done = cli(environment(tmp_path), "demo", "-o", tmp_path / "demo", *options, cwd=tmp_path)
        assert done.returncode == 2 and "RANDOM" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("titok-fast: error: "), done.stderr
        assert not (tmp_path / "demo").exists()


def test_the_demo_uses_the_default_weights_when_they_are_there(hub, tmp_path):
    """$TITOK_FAST_CHECKPOINT names the default weights; cached, the demo uses them instead of falling back."""
    env = environment(tmp_path, HF_HOME=str(hub / "hf"), TITOK_FAST_CHECKPOINT=REPO)
    done = cli(env, "demo", "-o", tmp_path / "demo", "--config", "tiny", "--grid", "4x32x32", "--tokens", "8")
    assert done.returncode == 0, done.stderr
    assert f"weights: {REPO}" in done.stderr and "RANDOM" not in done.stderr
    assert "PSNR:" in done.stdout and "4x32x32, 8 tokens" in done.stdout
    assert load_tokens(tmp_path / "demo" / "tokens" / "sample.safetensors").weights_source.startswith(f"hf://{REPO}@")


def test_a_hub_safetensors_brings_its_own_config(tmp_path, monkeypatch):
    """Our .safetensors on the Hub needs no --config and no conversion; the pinned reference is recorded."""
    from titok_fast import hub as hub_module
    from titok_fast.loading import save_safetensors

    save_safetensors(make_model("tiny"), tmp_path / "w.safetensors")
    pinned = HubRef("someone/converted", COMMIT, "w.safetensors")
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (tmp_path / "w.safetensors", pinned))
    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    model = load_tokenizer("someone/converted:w.safetensors")
    assert model.config.name == "tiny" and model.weights_source == f"hf://someone/converted@{COMMIT}:w.safetensors"
    assert not (tmp_path / "converted").exists()


def test_weights_in_a_sub_folder_of_a_hub_repository_resolve_pinned_to_their_commit(tmp_path, hub_library):
    """``owner/name:sub/model.ckpt``: the snapshot's file is a folder deeper, and the commit is the name of the
    folder above the file's path in the repository, not of the file's own folder ("sub", no commit: refused as a
    damaged cache)."""
    from titok_fast.hub import download

    (tmp_path / "w.ckpt").write_bytes(b"weights")
    hub_cache(hub_library, REPO, {"sub/model.ckpt": tmp_path / "w.ckpt", "a/b/c.ckpt": tmp_path / "w.ckpt"})
    snapshot = hub_library / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    for name in ("sub/model.ckpt", "a/b/c.ckpt"):
        local, pinned = download(parse_hub_ref(f"{REPO}:{name}"))
        assert local == snapshot / name and local.read_bytes() == b"weights"
        assert pinned == HubRef(REPO, COMMIT, name) and str(pinned) == f"hf://{REPO}@{COMMIT}:{name}"


@pytest.mark.parametrize("error, status", [("RepositoryNotFoundError", 404), ("HfHubHTTPError", 404),
                                           ("HfHubHTTPError", 403)])  # fmt: skip
def test_a_hub_that_refuses_a_file_is_a_one_line_error_naming_the_weights(hub_library, monkeypatch, error, status):
    """A repository that is not there (a typo), private (403) or any other HTTP error of the Hub ended the run with
    the library's traceback and its several lines: one line now, naming the weights and the Hub's first line."""
    import types

    import huggingface_hub
    from huggingface_hub import errors

    from titok_fast.hub import download

    first = f"{status} Client Error. (Request ID: Root=1-abc)"

    def refused(*args, **kwargs):  # (huggingface_hub's function, as download() imports it at each call)
        response = types.SimpleNamespace(status_code=status, headers={}, request=None)  # (what the error reads)
        raise getattr(errors, error)(f"{first}\n\nRepository Not Found for url: https://huggingface.co/x",
                                     response=response)  # fmt: skip

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refused)
    with pytest.raises(ValueError) as raised:
        download(parse_hub_ref("someone/typo@v2:sub/w.ckpt"))
    assert str(raised.value) == f"weights hf://someone/typo@v2:sub/w.ckpt cannot be fetched from the Hub: {first}"


def test_a_hub_is_reachable_when_it_answers_whatever_it_answers(monkeypatch):
    """The Hub is asked once, briefly, whether it is there before huggingface_hub is (which retries an unreachable
    Hub for half a minute): an answer with an error status (a HEAD the endpoint does not allow, 405) is an answer,
    and the library then fetches as usual; a port nobody listens on is no answer, and the cache is used."""
    import http.server
    import socket
    import threading

    from titok_fast.hub import _reachable

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(405)
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.setenv("no_proxy", "127.0.0.1")  # (a proxy would answer for a closed port)
    server = http.server.HTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _reachable(f"http://127.0.0.1:{server.server_port}", 10.0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert not _reachable(f"http://127.0.0.1:{port}", 10.0)


def test_a_cached_hub_file_is_keyed_by_its_blob_name_other_files_by_their_bytes(hub, tmp_path):
    from titok_fast.hub import file_sha256

    expected = hashlib.sha256((hub / "model.ckpt").read_bytes()).hexdigest()
    snapshot = hub / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / DEFAULT_FILE
    assert file_sha256(hub / "model.ckpt") == expected == file_sha256(snapshot)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ("0" * 64)).write_bytes(b"x")  # a blob is trusted to be named by its sha256
    assert file_sha256(tmp_path / "blobs" / ("0" * 64)) == "0" * 64
    (tmp_path / ("0" * 64)).write_bytes(b"x")  # outside a blobs folder the bytes are read
    assert file_sha256(tmp_path / ("0" * 64)) == hashlib.sha256(b"x").hexdigest()


@pytest.fixture
def within_seconds():
    """Fails a test that is still running after 20 s (hashing /dev/zero, or opening a FIFO with no writer, would
    never end): SIGALRM interrupts a blocked open or read with an error."""
    import signal

    def late(*args):
        raise TimeoutError("still running after 20 s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("kind", "what"), [("zero", "a character device"), ("fifo", "a FIFO"), ("folder", "a folder")])
def test_a_cached_file_that_is_not_a_regular_file_is_refused_before_it_is_read(tmp_path, monkeypatch, within_seconds,
                                                                              kind, what):  # fmt: skip
    """A snapshot file linked to /dev/zero was hashed for ever, a FIFO blocked its reader, a folder failed in its own
    words: each is one line naming the file, whether the link leads into a blobs folder (the name is the hash) or
    not, and nothing is converted."""
    from titok_fast.config import TiTokConfig
    from titok_fast.loading import converted

    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    for i, blob in enumerate([tmp_path / "other" / "x.ckpt", tmp_path / "blobs" / ("0" * 64)]):
        blob.parent.mkdir()
        if kind == "zero":
            blob = "/dev/zero"
        elif kind == "fifo":
            os.mkfifo(blob)
        else:
            blob.mkdir()
        link = tmp_path / f"snapshot{i}" / DEFAULT_FILE
        link.parent.mkdir()
        os.symlink(blob, link)
        with pytest.raises(ValueError, match=rf"^{link} is not a regular file \(it is {what}, where its links lead\)"):
            converted(link, TiTokConfig.from_any("tiny"))
    assert not (tmp_path / "converted").exists()


def test_a_file_swapped_for_a_fifo_after_its_check_is_refused_as_opened(tmp_path, monkeypatch, within_seconds):
    """A file is checked before it is opened and again on what was opened: a FIFO put in its place between the two
    (here: a path whose look says "regular file") is refused in one line once opened, not read from (which would
    wait for a writer for ever)."""
    from titok_fast.hub import open_regular

    regular, fifo = tmp_path / "w.ckpt", tmp_path / "swapped.ckpt"
    regular.write_bytes(b"weights")
    os.mkfifo(fifo)
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stat(regular if str(path) == str(fifo) else path, *a, **k))
    with pytest.raises(ValueError, match=rf"^{fifo} is not a regular file \(it is a FIFO, where its links lead\)"):
        open_regular(fifo).close()
    with open_regular(regular) as f:
        assert f.read() == b"weights"


def test_a_cache_entry_is_used_only_as_the_conversion_of_the_checkpoint_it_records(hub, tmp_path, monkeypatch):
    """Any file put under a conversion's cache name was loaded as the genuine checkpoint's (and recorded as its Hub
    commit), and an entry cut short failed every run from then on. An entry now records the sha256 of the bytes it
    was converted from: another file there, or one cut short, is converted again over it; something that is not
    a file there is refused in one line."""
    from titok_fast.config import TiTokConfig
    from titok_fast.loading import converted

    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    tiny = TiTokConfig.from_any("tiny")
    entry = converted(hub / "model.ckpt", tiny)
    genuine = load_tokenizer(entry).weights_digest
    assert genuine == load_tokenizer(hub / "model.ckpt", config="tiny").weights_digest
    other = make_model("tiny", seed=1)
    from titok_fast.loading import save_safetensors

    save_safetensors(other, entry)  # other weights under the cache name (a file with no record of its source)
    assert load_tokenizer(converted(hub / "model.ckpt", tiny)).weights_digest == genuine
    entry.write_bytes(entry.read_bytes()[:1000])  # cut short
    assert load_tokenizer(converted(hub / "model.ckpt", tiny)).weights_digest == genuine
    entry.unlink()
    entry.mkdir()
    with pytest.raises(ValueError, match=rf"^{entry}: the cache entry for this conversion is a folder, not a file"):
        converted(hub / "model.ckpt", tiny)


def test_a_conversion_removes_the_entries_earlier_versions_keyed_by_config(hub, tmp_path, monkeypatch):
    """Before 2026-12-06 a conversion's name held a hash of the config too (a V1 model's worth per config): the
    checkpoint's conversion now removes those entries of it, and leaves other checkpoints', and what is no file."""
    from titok_fast.config import TiTokConfig
    from titok_fast.hub import file_sha256
    from titok_fast.loading import converted

    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    folder = tmp_path / "converted" / "converted"
    folder.mkdir(parents=True)
    sha = file_sha256(hub / "model.ckpt")
    old = [folder / f"{sha}-{key}.safetensors" for key in ("0123456789ab", "ba9876543210")]
    kept = [folder / f"{'0' * 64}-0123456789ab.safetensors", folder / f"{sha}-0123456789abc.safetensors",
            folder / f"{sha}-notes.safetensors"]  # fmt: skip
    for path in old + kept:
        path.write_bytes(b"an old conversion")
    (folder / f"{sha}-00000000000f.safetensors").mkdir()
    entry = converted(hub / "model.ckpt", TiTokConfig.from_any("tiny"))
    assert entry.parent == folder
    assert not any(p.exists() for p in old) and all(p.exists() for p in kept)
    assert (folder / f"{sha}-00000000000f.safetensors").is_dir()


def test_hub_weights_whose_cache_gives_no_commit_are_refused(hub, tmp_path):
    """A damaged cache whose ref names no commit (refs/main holding "notacommit", and a snapshot folder of that
    name) was loaded and recorded unpinned, and decode then refused the token files it had just made."""
    repo = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    hub_cache(tmp_path / "hf", REPO, {DEFAULT_FILE: hub / "model.ckpt"})
    (repo / "snapshots" / COMMIT).rename(repo / "snapshots" / "notacommit")
    (repo / "refs" / "main").write_text("notacommit")
    run = cli(environment(tmp_path), "encode", hub / "clip.mp4", "-o", tmp_path / "t", "--checkpoint", REPO,
              "--config", "tiny", *GRID)  # fmt: skip
    assert run.returncode == 2 and not (tmp_path / "t").exists(), run.stderr
    assert "in a snapshot folder 'notacommit' that is not a commit (40 hex digits)" in run.stderr


@pytest.mark.parametrize("place, kind", [("hub/models--someone--tiny-titok/refs/main", "sparse"), ("token", "fifo"),
                                         ("stored_tokens", "sparse")])  # fmt: skip
def test_a_small_file_the_hub_library_reads_whole_is_refused_unless_it_is_small(hub, tmp_path, place, kind):
    """huggingface_hub reads the cache's ref of a branch, the token file and the stored tokens whole, unchecked: a
    sparse refs/main of 3 GB took all of a 24 GB machine's memory, a token file that is a FIFO hung the run. Such a
    file is refused in one line before the library is called, nothing written."""
    hub_cache(tmp_path / "hf", REPO, {DEFAULT_FILE: hub / "model.ckpt"})
    path = tmp_path / "hf" / place
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.truncate(64 << 20)
    cmd = [sys.executable, "-m", "titok_fast.cli", "encode", str(hub / "clip.mp4"), "-o", str(tmp_path / "t"),
           "--checkpoint", REPO, "--config", "tiny", *GRID]  # fmt: skip
    run = subprocess.run(cmd, env=environment(tmp_path), capture_output=True, text=True, timeout=120)
    what = {"sparse": "a file of 67,108,864 bytes", "fifo": "a FIFO"}[kind]
    assert run.returncode == 2 and not (tmp_path / "t").exists() and not (tmp_path / "converted").exists()
    assert f"{path} is {what}" in run.stderr and "expected a regular file of at most" in run.stderr, run.stderr


def test_the_ref_of_a_branch_named_is_checked_as_the_default_branchs(tmp_path, hub_library):
    """``owner/name@dev`` has huggingface_hub read refs/dev whole, as it reads refs/main for the default branch: a
    sparse one of 64 MiB is refused in one line before the library is called, as refs/main is."""
    from titok_fast.hub import download

    (tmp_path / "w.ckpt").write_bytes(b"weights")
    hub_cache(hub_library, REPO, {DEFAULT_FILE: tmp_path / "w.ckpt"})
    ref = hub_library / "hub" / f"models--{REPO.replace('/', '--')}" / "refs" / "dev"
    with open(ref, "wb") as f:
        f.truncate(64 << 20)
    with pytest.raises(ValueError, match=rf"^the Hugging Face cache's ref {ref} is a file of 67,108,864 bytes, where"):
        download(parse_hub_ref(f"{REPO}@dev"))
    assert download(parse_hub_ref(REPO))[1] == HubRef(REPO, COMMIT)  # (refs/main, small, is read)


def test_a_hugging_face_home_that_is_a_file_is_said_in_one_line(tmp_path, hub_library, monkeypatch):
    """HF_HOME naming a file: its token file's folder is no folder, which was taken for "no token file", and the
    library then failed on it with a bare "[Errno 20] Not a directory"."""
    from huggingface_hub import constants

    from titok_fast.hub import download

    (tmp_path / "w.ckpt").write_bytes(b"weights")
    hub_cache(hub_library, REPO, {DEFAULT_FILE: tmp_path / "w.ckpt"})
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "afile" / "token"))
    with pytest.raises(ValueError, match=rf"^the Hugging Face token file {tmp_path / 'afile' / 'token'} cannot be "
                                         r"looked at \(Not a directory\)$"):  # fmt: skip
        download(parse_hub_ref(REPO))


def test_a_ref_that_leads_out_of_its_repositorys_folder_is_not_read(tmp_path, hub_library, monkeypatch):
    """A cache copied from elsewhere whose refs/main links to a small file outside it: huggingface_hub read that
    file (any small file the user can read) as the commit to load. It is refused in one line, nothing read; a ref
    linking to a file inside the repository's folder is read as before."""
    import builtins

    from titok_fast.hub import download

    (tmp_path / "w.ckpt").write_bytes(b"weights")
    hub_cache(hub_library, REPO, {DEFAULT_FILE: tmp_path / "w.ckpt"})
    ref = hub_library / "hub" / f"models--{REPO.replace('/', '--')}" / "refs" / "main"
    (tmp_path / "secret.txt").write_text(COMMIT)
    ref.unlink()
    ref.symlink_to(tmp_path / "secret.txt")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(os.fspath(f)) or real_open(f, *a, **k))
    with pytest.raises(ValueError, match=rf"^the Hugging Face cache's ref {ref} leads to {tmp_path / 'secret.txt'}, "
                                         r"outside the repository's folder .*: not read"):  # fmt: skip
        download(parse_hub_ref(REPO))
    assert not [f for f in opened if f in (str(ref), str(tmp_path / "secret.txt"))]
    (ref.parent / "main-copy").write_text(COMMIT)  # a link within the folder: read
    ref.unlink()
    ref.symlink_to("main-copy")
    assert download(parse_hub_ref(REPO))[1] == HubRef(REPO, COMMIT)
    assert str(ref) in opened


def test_a_cached_file_that_leads_out_of_its_repositorys_folder_is_refused(hub, tmp_path):
    """A snapshot's file links to a blob of its repository. One that leads elsewhere (a cache made or changed by
    someone else) was loaded, any file on the machine, and recorded as the Hub's weights at that commit."""
    repo = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    hub_cache(tmp_path / "hf", REPO, {DEFAULT_FILE: hub / "model.ckpt"})
    outside = tmp_path / "elsewhere.ckpt"
    shutil.copy(hub / "model.ckpt", outside)
    (repo / "snapshots" / COMMIT / DEFAULT_FILE).unlink()
    os.symlink(outside, repo / "snapshots" / COMMIT / DEFAULT_FILE)
    run = cli(environment(tmp_path), "encode", hub / "clip.mp4", "-o", tmp_path / "t", "--checkpoint", REPO,
              "--config", "tiny", *GRID)  # fmt: skip
    assert run.returncode == 2 and not (tmp_path / "t").exists(), run.stderr
    assert f"leads to {outside}, outside the repository's folder {repo}: not loaded" in run.stderr


def test_a_blob_not_holding_the_bytes_its_name_says_never_enters_the_converted_cache(hub, tmp_path, monkeypatch):
    """Other weights put under blobs/<sha256 of the genuine file> were converted and cached under that sha256 for
    good: a later honest cache holding the genuine blob still loaded them. A conversion is keyed by the bytes read,
    and a blob whose bytes are not its name is refused in one line, nothing cached."""
    from titok_fast import hub as hub_module

    genuine = (hub / "model.ckpt").read_bytes()
    lightning_checkpoint(tmp_path / "other.ckpt", make_model("tiny", seed=1))
    other = (tmp_path / "other.ckpt").read_bytes()
    blob = tmp_path / "poisoned" / "blobs" / hashlib.sha256(genuine).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(other)
    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (blob, HubRef(REPO, COMMIT)))
    claims = f"its bytes have sha256 {hashlib.sha256(other).hexdigest()}, not the {blob.name} its Hugging Face"
    with pytest.raises(ValueError, match=f"^{blob}: {claims}") as error:
        load_tokenizer(REPO, config="tiny")
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "converted").rglob("*.safetensors"))
    snapshot = hub / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / DEFAULT_FILE
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (snapshot, HubRef(REPO, COMMIT)))
    honest = load_tokenizer(REPO, config="tiny")
    assert honest.weights_digest == load_tokenizer(hub / "model.ckpt", config="tiny").weights_digest


def test_a_blob_that_is_no_checkpoint_is_refused_before_its_bytes_are_hashed(hub, tmp_path, monkeypatch):
    """A cache's blob (or any pinned file a stranger's token file names) of gigabytes that is no checkpoint was
    hashed whole, twice, before the archive was looked at: its directory is read first now."""
    from titok_fast import hub as hub_module

    blob = tmp_path / "big" / "blobs" / ("0" * 64)
    blob.parent.mkdir(parents=True)
    with open(blob, "wb") as f:
        f.truncate(1 << 30)  # sparse: a gigabyte of zeros, no disk
    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (blob, HubRef(REPO, COMMIT)))
    hashed, file_sha256 = [], hub_module.file_sha256

    def hashing(path, *args, **kwargs):
        hashed.append(kwargs.get("trust_blob_name", True))
        return file_sha256(path, *args, **kwargs)

    monkeypatch.setattr(hub_module, "file_sha256", hashing)
    with pytest.raises(ValueError, match=f"^{blob} is not a torch zip checkpoint"):
        load_tokenizer(REPO, config="tiny")
    assert hashed == [True]  # (by its name alone: not read)


@pytest.mark.parametrize("damage", ["central directory", "local header"])
def test_a_blob_whose_archive_is_damaged_is_refused_in_one_line_naming_it(hub, tmp_path, monkeypatch, damage):
    """A zip whose signatures are damaged broke zipfile's parser before the blob's bytes were hashed, outside the
    guard that names the file: a bare BadZipFile stopped `--checkpoint hf://...`, and a `decode` whose first token
    file named such a pinned Hub file, instead of trying the next file's weights."""
    from titok_fast import hub as hub_module
    from titok_fast.loading import CheckpointError

    data = (hub / "model.ckpt").read_bytes()
    at = data.rfind(b"PK\x01\x02") if damage == "central directory" else data.find(b"PK\x03\x04")
    blob = tmp_path / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(data[:at] + b"XX" + data[at + 2 :])
    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (blob, HubRef(REPO, COMMIT)))
    with pytest.raises(CheckpointError, match=f"^{blob}: cannot be read \\(BadZipFile: Bad magic number"):
        load_tokenizer(REPO, config="tiny")


def test_a_blob_replaced_while_it_is_converted_is_not_cached(hub, tmp_path, monkeypatch):
    """The bytes hashed must be those converted: a blob swapped for other weights once its bytes were hashed (the
    hash then agrees with its name) is refused, nothing cached."""
    from titok_fast import hub as hub_module

    genuine = hub / "model.ckpt"
    blob = tmp_path / "blobs" / hashlib.sha256(genuine.read_bytes()).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(genuine.read_bytes())
    lightning_checkpoint(tmp_path / "other.ckpt", make_model("tiny", seed=1))
    hashed = hub_module.file_sha256

    def hash_then_swap(path, *args, **kwargs):
        digest = hashed(path, *args, **kwargs)
        if not kwargs.get("trust_blob_name", True):  # the bytes were read: now another file takes the blob's name
            os.replace(tmp_path / "other.ckpt", blob)
        return digest

    monkeypatch.setenv("TITOK_FAST_CACHE", str(tmp_path / "converted"))
    monkeypatch.setattr(hub_module, "file_sha256", hash_then_swap)
    monkeypatch.setattr(hub_module, "download", lambda ref, quick=False: (blob, HubRef(REPO, COMMIT)))
    with pytest.raises(ValueError, match=f"^{blob}: changed while it was hashed and converted; nothing was cached"):
        load_tokenizer(REPO, config="tiny")
    assert not list((tmp_path / "converted").rglob("*.safetensors"))


def test_ema_and_raw_conversions_of_one_checkpoint_are_cached_apart(tmp_path, monkeypatch):
    """A Hub load with the default EMA weights, then one with use_ema=False, each get their own conversion."""
    from titok_fast import hub, loading

    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    src = tmp_path / "model.ckpt"
    model = make_model("tiny")
    lightning_checkpoint(src, model)  # ema_model.* = model.* + 1
    ema = loading.converted(src, model.config, use_ema=True)
    raw = loading.converted(src, model.config, use_ema=False)
    assert ema != raw
    _, raw_state, _, _ = loading.load_state(raw)
    key = next(iter(raw_state))
    assert torch.equal(raw_state[key], model.state_dict()[key])  # the raw weights, not the EMA ones cached first


def test_the_cache_of_converted_weights_is_where_the_environment_says(tmp_path, monkeypatch):
    from titok_fast import hub

    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "titok-fast"
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "own"))
    assert hub.cache_dir() == tmp_path / "own"
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "titok-fast"


@pytest.mark.parametrize("cache", ["a file", "read-only", "full"])
def test_a_cache_that_cannot_be_used_reads_the_checkpoint_as_it_is(tmp_path, hub_library, monkeypatch, capsys, cache):
    """$TITOK_FAST_CACHE naming a file, or a folder that cannot be written, stopped the run with a bare "[Errno 20]
    Not a directory" though the checkpoint was there to read: it is read as it is (the same weights and digest),
    with a notice saying why, once."""
    from titok_fast import hub

    model = make_model("tiny", seed=3)
    lightning_checkpoint(tmp_path / "m.ckpt", model)
    hub_cache(hub_library, REPO, {DEFAULT_FILE: tmp_path / "m.ckpt"})
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "usable"))
    cached = load_tokenizer(REPO, config="tiny")
    place = tmp_path / "cache"
    if cache == "a file":
        place.write_text("")
    elif cache == "read-only":  # (found before the checkpoint is converted: the tests run as root, who writes
        place.mkdir()  # anywhere)
        monkeypatch.setattr("titok_fast.loading.tempfile.TemporaryFile", lambda *a, **k: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")))
    else:  # (found as the conversion is written)
        place.mkdir()
        monkeypatch.setattr("titok_fast.loading.save_safetensors", lambda *a, **k: (_ for _ in ()).throw(
            OSError(28, "No space left on device")))
    monkeypatch.setenv(hub.CACHE_ENV, str(place))
    capsys.readouterr()
    for _ in range(2):
        loaded = load_tokenizer(REPO, config="tiny")
        assert loaded.weights_digest == cached.weights_digest
        pairs = zip(loaded.state_dict().values(), cached.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    said = capsys.readouterr().err
    why = {"a file": "Not a directory", "read-only": "Permission denied", "full": "No space left on device"}[cache]
    assert ("converting" in said) == (cache == "full"), said  # (a conversion begun only where it could be kept)
    assert said.count(f"titok-fast's cache of converted weights ({place}: $TITOK_FAST_CACHE, else "
                      f"$XDG_CACHE_HOME/titok-fast) cannot be used: {why}; the checkpoint is read as it is") == 1, said


def test_a_cache_entry_converted_from_another_checkpoint_is_converted_again(tmp_path, monkeypatch):
    """A conversion is used only if its metadata names the checkpoint's own sha256: another checkpoint's copied
    under its name (stale, or planted) is converted over."""
    from titok_fast import hub, loading

    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    a, b = make_model("tiny", seed=0), make_model("tiny", seed=1)
    lightning_checkpoint(tmp_path / "a.ckpt", a)
    lightning_checkpoint(tmp_path / "b.ckpt", b)
    for_a, for_b = loading.converted(tmp_path / "a.ckpt", a.config), loading.converted(tmp_path / "b.ckpt", b.config)
    shutil.copyfile(for_b, for_a)
    assert loading.converted(tmp_path / "a.ckpt", a.config) == for_a
    assert loading.read_safetensors_metadata(for_a)["source_sha256"] == hub.file_sha256(tmp_path / "a.ckpt")


def test_a_cached_conversion_is_loaded_with_the_config_given_without_a_word(tmp_path, monkeypatch, capsys):
    """A conversion in the cache is keyed by its checkpoint alone and stores the config of the load that made it:
    a later load with another config (a Hub id's preset, where the first load gave --config) said "the config
    given differs from the one it stores" at every run, of a file the user never made."""
    from titok_fast import hub, loading
    from titok_fast.config import TiTokConfig

    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    model = make_model("tiny")
    lightning_checkpoint(tmp_path / "m.ckpt", model)
    other = TiTokConfig(**{**model.config.__dict__, "fsq_levels": (8, 5, 5, 5, 5), "name": "custom"})
    cached = loading.converted(tmp_path / "m.ckpt", other)  # (the first load's config, stored)
    capsys.readouterr()
    assert loading.load_state(cached, model.config)[0] == model.config
    assert capsys.readouterr().err == ""
