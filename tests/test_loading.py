"""Loading weights: Lightning checkpoints without running their code, safetensors with the config inside."""

import errno
import io
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from titok_fast.files import METADATA_KEY
from titok_fast.loading import CheckpointError, convert, load_tokenizer, read_safetensors_metadata, save_safetensors

from helpers import make_model, rel_l2


class RunsACommand:
    """Unpickling this with a normal unpickler would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)  # (a temporary folder may hold a space)


def lightning_checkpoint(path, model, marker=None, ema=True, extra=None):
    state = {}
    for k, v in model.state_dict().items():
        state[f"model.{k}"] = v
        if ema:
            state[f"ema_model.{k}"] = v + 1.0
    state["loss_module.disc.weight"] = torch.randn(4, 4)
    state.update(extra or {})
    ckpt = {
        "state_dict": state,
        "hyper_parameters": OmegaConf.create({"config": {"tokenizer": {"model": {"encoder_size": "tiny_thin"}}}}),
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(8)}}, "param_groups": [{"lr": 1e-4}]}],
        "pytorch-lightning_version": "2.4.0",
    }
    if marker is not None:
        ckpt["payload"] = RunsACommand(marker)
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def tiny():
    return make_model("tiny")


def test_checkpoint_code_never_runs(tiny, tmp_path):
    marker = tmp_path / "code-ran"
    lightning_checkpoint(tmp_path / "model.ckpt", tiny, marker=marker)
    torch.load(tmp_path / "model.ckpt", weights_only=False)  # proof the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    model = load_tokenizer(tmp_path / "model.ckpt", config="tiny")
    assert not marker.exists()
    assert torch.equal(model.encoder.proj_in.weight, tiny.encoder.proj_in.weight + 1.0)


@pytest.mark.parametrize("use_ema, ema_present, offset", [(True, True, 1.0), (False, True, 0.0), (True, False, 0.0)])
def test_ema_is_preferred_when_present(tiny, tmp_path, use_ema, ema_present, offset):
    lightning_checkpoint(tmp_path / "m.ckpt", tiny, ema=ema_present)
    model = load_tokenizer(tmp_path / "m.ckpt", config="tiny", use_ema=use_ema)
    for k, v in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[k], v + offset), k


def test_bare_state_dict_and_dtype_device(tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "bare.pt")
    model = load_tokenizer(tmp_path / "bare.pt", config="tiny", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert torch.equal(model.decoder.proj_out.bias, tiny.decoder.proj_out.bias.bfloat16())


def test_a_bad_dtype_or_device_is_one_line_before_any_file_is_read(tmp_path):
    missing = tmp_path / "not-read.safetensors"  # never looked at: the arguments are checked first
    dtypes = "expected one of torch.float32, torch.bfloat16, torch.float16, torch.float64"
    for kwargs, error, message in [
        (dict(dtype=torch.int32), TypeError, f"dtype torch.int32: {dtypes}"),
        (dict(dtype="float16"), TypeError, f"dtype 'float16': {dtypes}"),
        (dict(dtype=torch.float8_e4m3fn), TypeError, "dtype torch.float8_e4m3fn: expected one of"),
        (dict(device="gpu"), ValueError, "device 'gpu': not a device ("),
        (dict(device=3.5), ValueError, "device 3.5: not a device ("),
    ]:
        with pytest.raises(error) as raised:
            load_tokenizer(missing, **kwargs)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda': CUDA is not available here \(no GPU, or a CPU build"):
            load_tokenizer(missing, device="cuda")
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):  # another kind of device, not built in or not here
        with pytest.raises(ValueError, match=r"^device 'xpu': not available in this torch build or on this machine "
                                             r"\([^\n]+\)$"):  # fmt: skip
            load_tokenizer(missing, device="xpu")


def test_a_safetensors_file_named_otherwise_is_read_as_one(tiny, tmp_path):
    save_safetensors(tiny, tmp_path / "w.safetensors")
    for name in ("W.SAFETENSORS", "weights.bin", "weights"):
        (tmp_path / name).write_bytes((tmp_path / "w.safetensors").read_bytes())
        model = load_tokenizer(tmp_path / name)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.state_dict().items()), name


def test_a_token_file_given_as_weights_is_called_one(tmp_path):
    """A token file (also a .safetensors) passed as --checkpoint: said in one line, not as 194 missing tensors."""
    from test_tokens import make_token_file

    from titok_fast.tokens import save_tokens

    save_tokens(tmp_path / "clip.safetensors", make_token_file())
    with pytest.raises(CheckpointError, match=r"clip\.safetensors: is a token file \(written by encode\), not model "
                                              r"weights; expected a \.ckpt \(\.pt, \.pth\) or a \.safetensors of "
                                              r"weights$"):  # fmt: skip
        load_tokenizer(tmp_path / "clip.safetensors")


def test_missing_and_misshaped_tensors_are_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["decoder.ln_pre.bias"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"missing tensor decoder.ln_pre.bias \(1 missing in all for config "
                       r"'tiny'\); does the config match the checkpoint\?$"):  # fmt: skip
        load_tokenizer(tmp_path / "missing.ckpt", config="tiny")
    state = dict(tiny.state_dict())
    state["encoder.proj_out.weight"] = torch.zeros(4, 512)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match=r"encoder.proj_out.weight has shape \[4, 512\], expected \[5, 512\]"):
        load_tokenizer(tmp_path / "shape.ckpt", config="tiny")
    with pytest.raises(CheckpointError, match="unexpected tensor|missing tensor"):
        load_tokenizer(tmp_path / "shape.ckpt", config="v1")
    state = {**tiny.state_dict(), "decoder.x\nsecond line": torch.zeros(1)}  # a name from the file: one line still
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "name.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'decoder.x\\nsecond line'") as error:
        load_tokenizer(tmp_path / "name.ckpt", config="tiny")
    assert "\n" not in str(error.value)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        load_tokenizer(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "absent.ckpt")
    (tmp_path / "folder.ckpt").mkdir()
    expected = r"expected a .ckpt \(.pt, .pth\) or .safetensors file, or a Hub id owner/name\[@revision\]\[:file\]"
    with pytest.raises(CheckpointError, match=rf"folder.ckpt is not a regular file; {expected}"):
        load_tokenizer(tmp_path / "folder.ckpt")
    with pytest.raises(CheckpointError, match=r"owner/name@.hidden does not exist \(nor a Hub id: its revision "
                                              r"'.hidden' is not a git ref name, no part of which starts with a dot\)"):
        load_tokenizer("owner/name@.hidden")
    with pytest.raises(CheckpointError, match=r"runs/exp@.1/model.ckpt does not exist; expected"):  # a local path
        load_tokenizer("runs/exp@.1/model.ckpt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(tiny, tmp_path, bad):
    """A NaN weight makes every index garbage (FSQ has no code for NaN): refused when loaded, in both formats."""
    state = tiny.state_dict()
    broken = dict(state, **{"encoder.proj_in.weight": state["encoder.proj_in.weight"].clone().fill_(bad)})
    model = make_model()
    model.load_state_dict(broken)
    lightning_checkpoint(tmp_path / "m.ckpt", model, ema=False)
    with pytest.raises(CheckpointError, match=r"m.ckpt: tensor encoder.proj_in.weight holds NaN or infinite values"):
        load_tokenizer(tmp_path / "m.ckpt", config="tiny")
    _weights_with_metadata(model, tmp_path / "w.safetensors", {"config": tiny.config.to_dict()})
    with pytest.raises(CheckpointError, match=r"w.safetensors: tensor encoder.proj_in.weight holds NaN or infinite"):
        load_tokenizer(tmp_path / "w.safetensors")


def test_convert_writes_config_and_loads_without_one(tiny, tmp_path):
    lightning_checkpoint(tmp_path / "m.ckpt", tiny)
    digest = convert(tmp_path / "m.ckpt", tmp_path / "m.safetensors", config="tiny")
    meta = read_safetensors_metadata(tmp_path / "m.safetensors")
    assert meta["config"]["tokenizer"]["model"]["encoder_size"] == "tiny_thin"
    assert meta["weights_digest"] == digest
    model = load_tokenizer(tmp_path / "m.safetensors")
    assert model.config.name == "tiny" and model.weights_digest == digest
    assert torch.equal(model.encoder.mask_token, tiny.encoder.mask_token + 1.0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("use_ema, ema_present", [(True, True), (False, True), (True, False)])
def test_convert_records_the_weights_it_took(tiny, tmp_path, capsys, use_ema, ema_present):
    """A checkpoint without EMA weights, converted with EMA asked for (the default), gave its raw weights and
    recorded ``ema: true``; it records what it took and says that no EMA weights were there."""
    lightning_checkpoint(tmp_path / "m.ckpt", tiny, ema=ema_present)
    convert(tmp_path / "m.ckpt", tmp_path / "m.safetensors", config="tiny", use_ema=use_ema)
    assert read_safetensors_metadata(tmp_path / "m.safetensors")["ema"] is (use_ema and ema_present)
    said = "m.ckpt holds no EMA weights (ema_model.*): its model weights were converted"
    assert (said in capsys.readouterr().err) is (use_ema and not ema_present)
    convert(tmp_path / "m.safetensors", tmp_path / "again.safetensors")  # a conversion's record carried on
    assert read_safetensors_metadata(tmp_path / "again.safetensors")["ema"] is (use_ema and ema_present)


def test_convert_cli(tiny, tmp_path):
    lightning_checkpoint(tmp_path / "m.ckpt", tiny)
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "titok_fast.cli", "convert", str(tmp_path / "m.ckpt"), str(out), "--config", "tiny"]
    subprocess.run([*cmd, "--no-ema"], check=True, capture_output=True, preexec_fn=lambda: os.umask(0o022))
    assert torch.equal(load_tokenizer(out).encoder.mask_token, tiny.encoder.mask_token)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # as any file the user makes: others' jobs read weights too
    bad = subprocess.run([*cmd[:4], str(tmp_path / "nope.ckpt"), str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_convert_cli_takes_the_config_a_safetensors_stores(tiny, tmp_path, capsys):
    """Without --config, convert reads a .safetensors with the config it carries (as --checkpoint does), not v1."""
    from titok_fast.cli import main

    save_safetensors(tiny, tmp_path / "tiny.safetensors")
    assert main(["convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "again.safetensors")]) == 0
    again = load_tokenizer(tmp_path / "again.safetensors")
    assert again.config.name == "tiny" and all(torch.equal(again.state_dict()[k], v) for k, v in
                                               tiny.state_dict().items())  # fmt: skip


def test_convert_never_writes_over_its_source_or_a_name_the_loader_misreads(tiny, tmp_path):
    """`convert m.ckpt m.ckpt` once replaced the only checkpoint with safetensors bytes under a name read as a zip."""
    lightning_checkpoint(tmp_path / "m.ckpt", tiny)
    before = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "m.ckpt")
    (tmp_path / "dir.safetensors").mkdir()
    for dst, message in [
        ("m.ckpt", "must end in .safetensors"),
        ("other.ckpt", "must end in .safetensors"),
        ("link.safetensors", "is the checkpoint being converted"),
        ("dir.safetensors", "is a folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            convert(tmp_path / "m.ckpt", tmp_path / dst, config="tiny")
    assert (tmp_path / "m.ckpt").read_bytes() == before and not (tmp_path / "other.ckpt").exists()


def test_save_safetensors_round_trip(tiny, tmp_path):
    save_safetensors(tiny, tmp_path / "w.safetensors")
    model = load_tokenizer(tmp_path / "w.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.state_dict().items())
    fp8 = load_tokenizer(tmp_path / "w.safetensors", precision="fp8")  # the same weights, FP8 linears
    assert fp8.precision == "fp8" and model.precision == "default"
    assert all(torch.equal(fp8.state_dict()[k], v) for k, v in tiny.state_dict().items())
    x = torch.randn(5, fp8.config.decoder.width)
    layer = fp8.decoder.model_layers.attn_layer[0].to_qkv
    assert 0 < rel_l2(layer(x), model.decoder.model_layers.attn_layer[0].to_qkv(x)) < 0.05  # the loaded weights


def test_tampered_archive_is_a_clear_error(tiny, tmp_path):
    import zipfile

    lightning_checkpoint(tmp_path / "m.ckpt", tiny, ema=False)
    with zipfile.ZipFile(tmp_path / "m.ckpt") as src, zipfile.ZipFile(tmp_path / "cut.ckpt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item.filename.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match=r"storage record .*data/0 holds 1024 bytes; needs 2048"):
        load_tokenizer(tmp_path / "cut.ckpt", config="tiny")


@pytest.mark.parametrize("wrapper", ["_orig_mod.", "module.", "module._orig_mod."])  # torch.compile, DataParallel
def test_compiled_model_prefix_is_stripped(tiny, tmp_path, wrapper):
    state = {f"model.{wrapper}{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "compiled.ckpt")
    model = load_tokenizer(tmp_path / "compiled.ckpt", config="tiny")
    assert torch.equal(model.encoder.proj_in.weight, tiny.encoder.proj_in.weight)


# Files from strangers: each test below holds a crafted file that the loader once accepted.


def test_a_storage_record_that_inflates_past_its_tensors_is_refused_unread(tiny, tmp_path):
    """A deflated record declaring 64 MiB behind a 2 KiB tensor: refused from its declared size, never inflated."""
    import zipfile

    lightning_checkpoint(tmp_path / "m.ckpt", tiny, ema=False)
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(tmp_path / "m.ckpt") as src, zipfile.ZipFile(bomb, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data/0"):  # encoder.mask_token's storage: [1, 512] float32
                dst.writestr(item.filename, data + bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(item, data)
    assert bomb.stat().st_size < (tmp_path / "m.ckpt").stat().st_size + (1 << 20)  # 64 MiB in under 1 MiB
    with pytest.raises(CheckpointError, match=r"compressed storage record .*data/0 inflates to 67110912 bytes"):
        load_tokenizer(bomb, config="tiny")


@pytest.mark.parametrize("method", ["bzip2", "lzma"])
def test_records_zip_inflates_in_unbounded_steps_are_refused_before_any_is_read(tiny, tmp_path, method):
    """zipfile bounds one read's output for deflate only: a bzip2 or LZMA record declaring 6 bytes inflated a 1.3 KB
    file to 2.8 GB in one read. Records compressed so are refused from the directory (this checkpoint is otherwise
    sound: zipfile reads it, and the loader did)."""
    import zipfile

    lightning_checkpoint(tmp_path / "m.ckpt", tiny, ema=False)
    other = tmp_path / "other.ckpt"
    compress = {"bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}[method]
    with zipfile.ZipFile(tmp_path / "m.ckpt") as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.infolist():
            packed = item.filename.endswith("/byteorder")
            dst.writestr(item.filename, src.read(item), compress_type=compress if packed else zipfile.ZIP_STORED)
    with pytest.raises(CheckpointError, match=rf"^[^\n]*other.ckpt: record '[^']*/byteorder' is compressed by zip "
                       rf"method {compress}; expected stored or deflated records$"):  # fmt: skip
        load_tokenizer(other, config="tiny")


def test_an_archive_folder_that_is_not_a_printable_name_is_refused_in_one_line(tmp_path):
    """Its records' names go into errors: a line break in the folder's name made an error of two lines, the second
    one of the file's choosing."""
    import pickle
    import zipfile

    path = tmp_path / "n.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a\nOK: weights verified/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("a\nOK: weights verified/byteorder", b"little" + bytes(20))
    with pytest.raises(CheckpointError, match=r"^[^\n]*n.ckpt: its archive's folder 'a\\nOK: weights verified/' is "
                       r"not a printable name of up to 256 characters$"):  # fmt: skip
        load_tokenizer(path, config="tiny")


def test_an_archive_folder_of_a_long_name_is_refused(tmp_path):
    """Its records' names go into errors: a folder name of thousands of characters would fill them."""
    import pickle
    import zipfile

    path = tmp_path / "n.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a" * 300 + "/data.pkl", pickle.dumps({}, protocol=2))
    with pytest.raises(CheckpointError, match=r"n.ckpt: its archive's folder 'a+ is not a printable name of up"):
        load_tokenizer(path, config="tiny")


def test_tensors_spanning_more_storage_than_the_model_needs_are_refused_unread(tiny, tmp_path):
    """A record's offset comes from the file: model-shaped tensors 64 MiB into a deflated storage of zeros (a few
    hundred KB on disk) would have the loader inflate and hold all of it. What the tensors span is bounded (twice the
    model's bytes and 1 MiB) before any record is read."""
    import zipfile

    offset = 16 << 20  # elements: 64 MiB of float32, past twice the tiny model's 31 MB
    numel = offset + max(v.numel() for v in tiny.state_dict().values())
    storage = _Storage(("storage", torch.FloatStorage, "0", "cpu", numel))
    path = _crafted_checkpoint(tmp_path / "far.ckpt", tiny, lambda s, st: _Record(storage, offset, s, st, False, None))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", bytes(numel * 4))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=rf"far.ckpt: its tensors span {numel * 4} bytes of storage; at most"):
        load_tokenizer(path, config="tiny")


def test_tensors_saved_as_views_of_larger_storages_load_holding_only_their_own_bytes(tiny, tmp_path):
    """torch.save writes a view's whole storage: model tensors saved as slices of larger ones (a fused weight split,
    say) load from the bytes they span, each into memory of its own (not a view keeping the rest of the record)."""
    state = {}
    for k, v in tiny.state_dict().items():
        whole = torch.cat([torch.full((100,), float("nan")), v.flatten(), torch.full((100,), float("nan"))])
        state[f"model.{k}"] = whole[100 : 100 + v.numel()].view(v.shape)
    torch.save({"state_dict": state}, tmp_path / "views.ckpt")
    loaded = load_tokenizer(tmp_path / "views.ckpt", config="tiny").state_dict()
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded[k], v), k
        assert loaded[k].untyped_storage().nbytes() == v.numel() * v.element_size(), k


def test_a_random_weights_digest_gives_only_a_seed_random_tokenizer_takes():
    """The digest comes from a stranger's token file: a seed of more digits than MAX_SEED has is no seed (4301
    digits made int() itself fail)."""
    from titok_fast.loading import random_seed

    assert random_seed("random-seed999999999999999999-0123456789abcdef") == 10**18 - 1
    for digits in ("1" * 19, "9" * 5000):
        assert random_seed(f"random-seed{digits}-0123456789abcdef") is None


def test_safetensors_metadata_is_bounded_before_it_is_parsed(tiny, tmp_path):
    """A 90 MB metadata of 30 million empty objects took 2.5 GB to parse; nesting too deep or a number too long
    for an int raised RecursionError or ValueError without the file's name, from the public reader and from the
    conversion cache's lookup."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    cases = {
        "long": ("[" + "{}," * 400_000 + "{}]", r"metadata 'titok_fast' is 1200004 characters; at most 1048576$"),
        "deep": ("[" * 100_000 + "]" * 100_000, r"metadata is not valid JSON \(RecursionError: maximum recursion"),
        "bigint": ("9" * 5000, r"metadata is not valid JSON \(ValueError: Exceeds the limit \(4300 digits\)"),
    }
    for name, (text, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"), metadata={"titok_fast": text})
        for read in (read_safetensors_metadata, load_tokenizer):
            with pytest.raises(CheckpointError, match=rf"^[^\n]*{name}.safetensors: {message}"):
                read(tmp_path / f"{name}.safetensors")
    # the header as a whole: its declared size is checked before the safetensors library reads it
    header = json.dumps({"__metadata__": {"titok_fast": "{}"}, "x": {"dtype": "F32", "shape": [0], "data_offsets":
                         [0, 0]}}).encode() + b" " * (16 << 20)  # fmt: skip
    (tmp_path / "wide.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"wide.safetensors: its safetensors header declares 16777\d+ bytes; at "
                       r"most 16777216$"):  # fmt: skip
        read_safetensors_metadata(tmp_path / "wide.safetensors")


def test_config_values_from_a_file_are_said_in_short_errors(tiny, tmp_path):
    """A size name of a million characters made an error of a million characters; so did numbers of thousands of
    digits, printed again by the checks after the first."""
    for field, value in [("encoder_size", "x" * 1_000_000), ("fsq_levels", [10**4000] * 5)]:
        config = tiny.config.to_dict()
        config["tokenizer"]["model"][field] = value
        _weights_with_metadata(tiny, tmp_path / "w.safetensors", {"config": config})
        with pytest.raises(CheckpointError) as error:
            load_tokenizer(tmp_path / "w.safetensors")
        said = str(error.value).removeprefix(str(tmp_path / "w.safetensors"))  # (the path's length is the folder's)
        assert said.startswith(": ") and "\n" not in said and len(said) <= 350, said  # (236 and 318 characters)


def _weights_with_metadata(model, path, meta):
    """A .safetensors holding `model`'s tensors and the JSON `meta` as its titok-fast metadata."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"titok_fast": json.dumps(meta)})


def test_a_config_string_in_metadata_is_never_opened(tiny, tmp_path):
    """A metadata config naming a file must not make the loader read that file (here a valid tiny config)."""
    import yaml

    local = tmp_path / "elsewhere.yaml"
    local.write_text(yaml.safe_dump(tiny.config.to_dict()))
    _weights_with_metadata(tiny, tmp_path / "w.safetensors", {"config": str(local)})
    with pytest.raises(CheckpointError, match="metadata config must be a JSON object; got str"):
        load_tokenizer(tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tokenizer.model.fsq_levels", [1000] * 5, r"fsq_levels \[1000, 1000, 1000, 1000, 1000\]: .* \[1000\]"),
        ("tokenizer.model.fsq_levels", [26, 2, 2, 2, 2], r"fsq_levels \[26, 2, 2, 2, 2\]: .* \[26\] inexactly"),
        ("tokenizer.model.fsq_levels", [4096] * 5, r"fsq_levels \[4096, 4096, 4096, 4096, 4096\] make \d+ codes"),
        ("tokenizer.model.fsq_levels", [25, 25, 25, 2, 2], "make 62500 codes; at most 32768"),
        # counted before any level is looked at: checking 1.6M levels once took minutes (a product per message);
        # the metadata's length bounds them at about 350 thousand
        ("tokenizer.model.fsq_levels", [2] * 340_000, r"^[^\n]{0,200}has 340000 levels; at most 15 [^\n]*$"),
        ("tokenizer.model.fsq_levels", ["x"] * 15, r"^[^\n]{0,200}must be a list of positive integers[^\n]{0,100}$"),
        (
            "tokenizer.model.patch_size",
            [16, 16, 32],
            r"patch_size \[16, 16, 32\] makes patches of 8192 voxels; at most",
        ),
        ("training.sampling.max_grid", [20, 100000, 192], r"max_grid \[20, 100000, 192\] exceeds"),
        ("training.sampling.max_grid", [1, 1, 1], r"max_grid \[1, 1, 1\] must be positive multiples of patch_size"),
        ("training.sampling.max_grid", [12, 160, 164], r"must be positive multiples of patch_size \[4, 8, 8\]"),
        ("training.sampling.num_token_range", [128, 1 << 30], "must be increasing and at most 65536"),
        ("training.sampling.num_token_range", [1024, 128], "must be increasing"),
    ],
)
def test_config_sizes_in_a_file_are_bounded_before_anything_is_built(tiny, tmp_path, field, value, message):
    """Five levels match the weights' shapes whatever their values: only a limit stops a 1e15-entry table; grids
    and token ranges size what the CLI allocates by default; a patch within MAX_PATCH per axis can still ask for
    an input projection of billions of weights (a token file naming random weights builds one from its config)."""
    config = tiny.config.to_dict()
    *path, name = field.split(".")
    config[path[0]][path[1]][name] = value
    _weights_with_metadata(tiny, tmp_path / "w.safetensors", {"config": config})
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(tmp_path / "w.safetensors")


def test_a_huge_patch_size_is_refused_before_a_layer_of_that_size_exists(tiny, tmp_path):
    """patch (64, 256, 256) would make a 12.6e6 x 512 input projection: refused from the config, not allocated."""
    config = tiny.config.to_dict()
    config["tokenizer"]["model"]["patch_size"] = [64, 256, 256]
    _weights_with_metadata(tiny, tmp_path / "w.safetensors", {"config": config})
    with pytest.raises(CheckpointError, match=r"patch_size \[64, 256, 256\] exceeds 64"):
        load_tokenizer(tmp_path / "w.safetensors")


def test_a_digest_in_metadata_must_match_the_tensors(tiny, tmp_path):
    _weights_with_metadata(tiny, tmp_path / "w.safetensors", {"config": tiny.config.to_dict(), "weights_digest": "x"})
    with pytest.raises(CheckpointError, match="metadata digest 'x' disagrees with its tensors"):
        load_tokenizer(tmp_path / "w.safetensors")


def test_weights_are_written_atomically(tiny, tmp_path, monkeypatch):
    """A failed write leaves the old file and no temporary one, and names the file."""
    import safetensors.torch

    save_safetensors(tiny, tmp_path / "w.safetensors")
    before = (tmp_path / "w.safetensors").read_bytes()

    def fail(file, *args, **kwargs):
        file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")  # (a write's error names no file)

    monkeypatch.setattr("titok_fast.loading.write_safetensors", fail)
    with pytest.raises(OSError, match=rf"^\[Errno 28\] No space left on device: '{tmp_path / 'w.safetensors'}'$"):
        save_safetensors(tiny, tmp_path / "w.safetensors")  # (said of the file asked for)
    assert (tmp_path / "w.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    assert safetensors.torch.load_file(tmp_path / "w.safetensors")


def test_weights_are_written_as_safetensors_writes_them(tmp_path):
    """The weights are written a tensor at a time into their own locked temporary, in the bytes
    ``safetensors.torch.save_file`` writes for the same tensors and metadata: every dtype it names, a scalar, an
    empty tensor, metadata that is not ASCII, and none."""
    import safetensors.torch

    from titok_fast.loading import SAFETENSORS_DTYPES, write_safetensors

    tensors = {f"{name}{i}": torch.arange(6).reshape(3, 2).to(dtype)
               for i, dtype in enumerate(SAFETENSORS_DTYPES) for name in "ba"}  # fmt: skip
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "odd": torch.ones(3, dtype=torch.int8)}
    for metadata in ({METADATA_KEY: json.dumps({"source": "vidéo \u2028 \"x\"\n"}, ensure_ascii=False)}, {}):
        safetensors.torch.save_file(tensors, str(tmp_path / "theirs"), metadata=metadata or None)
        with open(tmp_path / "ours", "wb") as file:
            write_safetensors(file, tensors, metadata)
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
        loaded = safetensors.torch.load_file(tmp_path / "ours")
        assert loaded.keys() == tensors.keys()
        assert all(loaded[k].dtype == t.dtype and torch.equal(loaded[k].view(torch.uint8), t.view(torch.uint8))
                   for k, t in tensors.items() if t.dim())  # fmt: skip
    with pytest.raises(ValueError, match=r"^tensor 'u' is torch.uint16: weights are written in torch.int64, "):
        write_safetensors(io.BytesIO(), {"a": torch.ones(2), "u": torch.ones(2, dtype=torch.uint16)}, {})


def test_a_conversion_removes_what_a_killed_conversion_left(tiny, tmp_path):
    """A ``convert`` or Hub conversion killed midway left a temporary of a model's size beside its output for good.
    The next write of the same file removes it, and leaves one another process is writing now (locked)."""
    import signal

    from titok_fast.files import AtomicFile
    from titok_fast.loading import weights_digest

    script = ("import os, sys; from titok_fast.files import AtomicFile; t = AtomicFile(sys.argv[1]).__enter__()"
              "; open(t.temporary, 'wb').write(b'half'); print(t.temporary, flush=True); os.kill(os.getpid(), 9)")
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.safetensors")], capture_output=True,
                            text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    left = killed.stdout.strip()
    assert os.path.exists(left)
    writing = AtomicFile(tmp_path / "w.safetensors").__enter__()  # another process's conversion under way
    save_safetensors(tiny, tmp_path / "w.safetensors")
    assert not os.path.exists(left) and os.path.exists(writing.temporary)
    assert load_tokenizer(tmp_path / "w.safetensors").weights_digest == weights_digest(tiny.state_dict())
    writing.discard()


def test_a_patch_volume_of_billions_of_weights_is_refused():
    """(64, 64, 64) is within MAX_PATCH per axis but makes 3.66e9 parameters with large_thin stacks: a token file
    naming random weights would build that model from its config."""
    from titok_fast.config import TiTokConfig
    from titok_fast.loading import MAX_PATCH_VOLUME, check_config

    big = TiTokConfig(
        patch_size=(64, 64, 64),
        fsq_levels=(7, 5, 5, 5, 5),
        encoder_size="large_thin",
        decoder_size="large_thin",
        max_grid=(64, 64, 64),
        num_token_range=(1, 2),
    )
    with pytest.raises(CheckpointError, match=r"token file: patch_size \[64, 64, 64\] makes patches of 262144 voxels"):
        check_config(big, "token file")
    check_config(TiTokConfig(patch_size=(4, 32, 32)))  # 4096 voxels: the bound itself is allowed
    assert MAX_PATCH_VOLUME >= 16 * 4 * 8 * 8  # room beyond V1's patches


def test_fsq_levels_are_taken_where_upstreams_float32_indices_are_exact():
    """A level is taken where upstream's own float32 index arithmetic ((q / h) * h + h, times the basis, summed) is
    exact for every code: every level up to 25, and larger ones such as 32. Elsewhere (26 first) the oracle's
    tokens are off by one for some codes, and no fast path could give upstream's tokens: refused in one line."""
    from titok_fast.config import TiTokConfig
    from titok_fast.loading import check_config, exact_fsq_level
    from titok_fast.reference import _fsq_tables, fsq_quantize

    taken = [level for level in range(2, 70) if exact_fsq_level(level)]
    assert taken == [*range(2, 26), *range(28, 38), 40, 41, 48, 49, 56, 57, *range(60, 70)]
    z = torch.linspace(-6, 6, 20001)[:, None]
    for level in (25, 26, 27, 32, 38, 64):  # the oracle itself, against exact indices
        half_l, offset, shift, half_width = _fsq_tables((level,), "cpu")[:4]
        exact = (torch.round((z + shift).tanh() * half_l - offset) + half_width).to(torch.int32)[:, 0]
        assert torch.equal(fsq_quantize(z, (level,))[1], exact) == exact_fsq_level(level), level
    check_config(TiTokConfig(fsq_levels=(32, 32, 32)))  # 32768 codes: the most a token file holds
    with pytest.raises(CheckpointError, match=r"^m.ckpt: fsq_levels \[26, 5\]: upstream computes the indices of "
                                              r"level\(s\) \[26\] inexactly"):  # fmt: skip
        check_config(TiTokConfig(fsq_levels=(26, 5)), "m.ckpt")
    with pytest.raises(CheckpointError, match=r"make 65536 codes; at most 32768 \(token files store indices as int16"):
        check_config(TiTokConfig(fsq_levels=(64, 32, 32)))
    from titok_fast import TiTok  # a model built from a config refuses what loading refuses, before any weight

    for levels, said in (((26, 5), r"level\(s\) \[26\] inexactly"), ((8,) * 6, "make 262144 codes")):
        with pytest.raises(CheckpointError, match=r"^config: fsq_levels .*" + said):
            TiTok(TiTokConfig(fsq_levels=levels, encoder_size="tiny_thin", decoder_size="tiny_thin"))


# Crafted pickles and archives: each builds a file torch.save never writes, in a few bytes where possible.


def _archive(path, pickle_bytes, records=None, byteorder=b"little"):
    """A torch-style zip checkpoint holding `pickle_bytes` as its data.pkl (deflated) and raw storage `records`."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for name, data in (records or {}).items():
            z.writestr(f"archive/data/{name}", data, compress_type=zipfile.ZIP_STORED)
    return path


@pytest.fixture
def never_unpickled(monkeypatch):
    """Fails the test if the restricted unpickler starts: a refusal must come before any object is built."""
    from titok_fast import loading

    def load(self):
        raise AssertionError("the pickle was unpickled")

    monkeypatch.setattr(loading._RestrictedUnpickler, "load", load)


def test_a_pickle_of_too_many_opcodes_is_refused_before_it_is_unpickled(tmp_path, never_unpickled, monkeypatch):
    """A data.pkl of empty lists deflates to a few KiB and would build one list per two bytes; its opcodes are
    counted first and the unpickler never starts. The bound is lowered here (counting the real one's 2 million
    opcodes takes seconds): twice the bound in opcodes, as a 4 MiB pickle is against the real one."""
    from titok_fast import loading

    monkeypatch.setattr(loading, "MAX_PICKLE_OPCODES", 100_000)
    bomb = _archive(tmp_path / "bomb.ckpt", b"\x80\x02]" + b"]a" * 100_000 + b".")  # 200 thousand opcodes
    assert bomb.stat().st_size < 4 << 10
    with pytest.raises(CheckpointError, match=r"bomb.ckpt: its pickle has more than 100000 opcodes"):
        load_tokenizer(bomb, config="tiny")


def _tuple_dag(levels: int, first: bytes = b"\x80\x02}", memo: int = 0) -> bytes:
    """A pickle that builds t_0 = 1, t_i = (t_(i-1), t_(i-1)) through its memo (t_i in entry ``memo`` + i, after
    ``first``): hashing t_levels visits 2**levels elements (tuples do not keep their hash)."""
    parts = [first, b"K\x01q" + bytes([memo]) + b"0"]
    for i in range(memo + 1, memo + levels + 1):
        parts.append(b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i]) + b"0")
    return b"".join(parts)


_DAG = b"N" + b"2\x86" * 40  # None, then (t, t) forty times over (DUP, TUPLE2): 2**40 elements to hash
_PASSED_ON = {  # the same key through what gives it back or hashes it: each was missed by the first check
    "BUILD": _DAG + b"Nb",  # BUILD leaves its object on the stack
    "_rebuild_parameter": b"ctorch._utils\n_rebuild_parameter\n" + _DAG + b"\x85R",  # gives its argument back
    "INST frozenset": b"(]" + _DAG + b"aibuiltins\nfrozenset\n",  # frozenset(list) hashes the list's items
    "OBJ frozenset": b"(cbuiltins\nfrozenset\n]" + _DAG + b"ao",
    "SETITEM on a list": b"cbuiltins\nfrozenset\n]NaK\x00" + _DAG + b"s\x85R",  # list[0] = key, then frozenset
}


@pytest.mark.parametrize("passed_on", sorted(_PASSED_ON))
def test_a_key_passed_on_by_other_opcodes_is_refused_too(tmp_path, never_unpickled, passed_on):
    bad = _archive(tmp_path / "keys.ckpt", b"\x80\x02}" + _PASSED_ON[passed_on] + b"Ns.")
    with pytest.raises(CheckpointError, match=r"keys.ckpt: its pickle uses a dict or set key that would take long"):
        load_tokenizer(bad, config="tiny")


@pytest.mark.parametrize("attack", ["shared tuples", "colliding ints", "deep tuple", "set of shared tuples"])
def test_keys_that_would_take_long_to_hash_are_refused_before_unpickling(tmp_path, never_unpickled, attack):
    """The C unpickler hashes every dict and set key, in C, where no signal is handled: a 334-byte pickle using
    a tuple of 40 levels of shared sub-tuples as a key would hash for hours (and Ctrl-C or SIGTERM could not stop
    it), 60,000 int keys that are multiples of 2**61 - 1 (they all hash alike) took 55 s, and a tuple nested a
    million deep crashed the interpreter (C stack). Each is refused before anything is unpickled."""
    import pickle

    if attack == "shared tuples":
        data = _tuple_dag(40) + b"h\x28K\x01s."  # {t_40: 1}
    elif attack == "colliding ints":
        m = (1 << 61) - 1
        data = b"\x80\x02}(" + b"".join(b"\x8a" + bytes([len(e)]) + e + b"N" for e in
                                         (pickle.encode_long(i * m) for i in range(1, 60001))) + b"u."  # fmt: skip
    elif attack == "deep tuple":
        data = b"\x80\x02})" + b"\x85" * 1_000_000 + b"K\x01s."
    else:  # set([t_40]), through a call
        data = _tuple_dag(40, first=b"\x80\x02c__builtin__\nset\nq\x00", memo=1) + b"]h\x29a\x85R."
    bad = _archive(tmp_path / "keys.ckpt", data)
    with pytest.raises(CheckpointError, match=r"keys.ckpt: its pickle uses a dict or set key that would take long"):
        load_tokenizer(bad, config="tiny")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_keys_checkpoints_use_pass_the_key_check(protocol):
    """Strings, small and large ints, floats, None, short tuples of them, objects, OrderedDicts, sets and
    frozensets pass the check of keys, in every protocol torch.save may write."""
    import pickle
    from collections import OrderedDict

    from titok_fast.loading import _check_opcodes

    value = {"state_dict": OrderedDict([("a.weight", 1), ("b", 2)]), "optimizer_states": [{"state": {0: {}, 7: {}}}],
             "seed": 2**63, 2**40: "x", 1.5: None, None: 0, ("betas", (0.9, 0.99)): 1, "s": {1, 2, "x", (1, 2)},
             "f": frozenset({"a", 3}), "o": OrderedDict([(("k", 1), [1, 2])]), b"bytes": 1}  # fmt: skip
    _check_opcodes(pickle.dumps(value, protocol=protocol))
    _check_opcodes(pickle.dumps(OrderedDict([((i, str(i)), i) for i in range(1000)]), protocol=protocol))


def test_a_pickle_larger_than_any_checkpoint_needs_is_refused_from_its_declared_size(tmp_path, never_unpickled):
    """One 33 MiB bytes object: few opcodes, but a data.pkl that large holds no checkpoint's records."""
    import struct

    from titok_fast.loading import MAX_PICKLE_BYTES

    size = 33 << 20
    big = _archive(tmp_path / "big.ckpt", b"\x80\x03B" + struct.pack("<I", size - 8) + bytes(size - 8) + b".")
    with pytest.raises(CheckpointError, match=rf"data.pkl declares {size} bytes; at most {MAX_PICKLE_BYTES}"):
        load_tokenizer(big, config="tiny")


def test_a_far_memo_index_is_refused_before_the_unpickler_grows_its_memo(tmp_path, never_unpickled):
    """LONG_BINPUT 2**24 in 9 bytes: the C unpickler would zero a memo table of 2**25 pointers (256 MiB)."""
    pickle_bytes = b"\x80\x02]r" + (1 << 24).to_bytes(4, "little") + b"."
    with pytest.raises(CheckpointError, match="m.ckpt: its pickle stores memo entry 16777216 after only 0 entries"):
        load_tokenizer(_archive(tmp_path / "m.ckpt", pickle_bytes), config="tiny")


def test_a_class_named_many_times_makes_one_placeholder_and_names_are_bounded(tmp_path):
    """Each GLOBAL opcode once made a new class (kilobytes each) from 6 bytes of pickle."""
    import io

    from titok_fast.loading import MAX_PICKLE_CLASSES, Placeholder, _RestrictedUnpickler

    named = _RestrictedUnpickler(io.BytesIO(b"\x80\x02]" + b"cX\nY\na" * 1000 + b".")).load()
    assert len(named) == 1000 and len(set(named)) == 1 and issubclass(named[0], Placeholder)
    many = b"".join(b"cm\n%d\na" % i for i in range(MAX_PICKLE_CLASSES + 1))
    with pytest.raises(CheckpointError, match=rf"names.ckpt: its pickle names more than {MAX_PICKLE_CLASSES} classes"):
        load_tokenizer(_archive(tmp_path / "names.ckpt", b"\x80\x02]" + many + b"."), config="tiny")


def test_long_class_names_are_refused_before_any_is_copied(tmp_path):
    """STACK_GLOBAL takes its names from the stack, so one stored string can name hundreds of classes, each name
    copied into its class (a 17 KB file of 300 such names of 16 MB took 5.3 GB): a name over MAX_GLOBAL_NAME
    characters is refused."""
    import struct

    from titok_fast.loading import MAX_GLOBAL_NAME

    def naming(module: bytes) -> bytes:  # [module.n]: BINUNICODE module, SHORT_BINUNICODE "n", STACK_GLOBAL
        return b"\x80\x04]X" + struct.pack("<I", len(module)) + module + b"\x8c\x01n\x93a."

    with pytest.raises(CheckpointError, match=rf"by a name over {MAX_GLOBAL_NAME} characters"):
        load_tokenizer(_archive(tmp_path / "long.ckpt", naming(b"m" * (MAX_GLOBAL_NAME + 1))), config="tiny")
    with pytest.raises(CheckpointError, match="no state_dict found"):  # (a name that fits: unpickled, as any other)
        load_tokenizer(_archive(tmp_path / "fits.ckpt", naming(b"m" * MAX_GLOBAL_NAME)), config="tiny")


def test_keys_made_of_numbers_are_bounded(tmp_path):
    """Numbers hash alike in every process, and each step of a tuple's hash can be undone: a pickle can give all
    its (int, int) keys one hash, and inserting n of them takes n**2 steps (100k keys, a 1.9 MB file: 98 s, in C).
    At most MAX_KEYS_OF_NUMBERS such keys (tuples or frozensets holding numbers) pass; strings, whose hashes are
    keyed per process, and plain numbers are not counted."""
    import pickle

    from titok_fast.loading import MAX_KEYS_OF_NUMBERS, _check_opcodes

    _check_opcodes(pickle.dumps({(i, i): 0 for i in range(MAX_KEYS_OF_NUMBERS)}, protocol=2))
    _check_opcodes(pickle.dumps({**{i: 0 for i in range(10_000)}, **{(str(i), "x"): 0 for i in range(10_000)}}))
    for many in ({(i, i): 0 for i in range(MAX_KEYS_OF_NUMBERS + 1)},
                 {frozenset({i, -i - 1}): 0 for i in range(MAX_KEYS_OF_NUMBERS + 1)},
                 {("name", (i, 1)): 0 for i in range(MAX_KEYS_OF_NUMBERS + 1)}):  # fmt: skip
        with pytest.raises(CheckpointError, match=f"more than {MAX_KEYS_OF_NUMBERS} dict or set keys that are tuples"):
            _check_opcodes(pickle.dumps(many, protocol=4))


def test_containers_built_from_one_list_again_and_again_are_bounded(tmp_path):
    """set(one list of 100k ints) twenty-one times: 21 sets from one list's bytes, refused once the elements copied
    pass MAX_PICKLE_OPCODES; placeholders called with one big tuple keep none of it."""
    import io
    import struct
    import tracemalloc

    from titok_fast.loading import MAX_PICKLE_OPCODES, _RestrictedUnpickler

    ints = b"(" + b"".join(b"J" + struct.pack("<i", i) for i in range(100_000))
    listed = ints + b"lq\x00"  # memo 0: a list of 100k ints
    sets = b"\x80\x02]" + listed + b"0c__builtin__\nset\nq\x010" + b"h\x01h\x00\x85Ra" * 21 + b"."
    with pytest.raises(CheckpointError, match=f"sets.ckpt: its pickle copies more than {MAX_PICKLE_OPCODES} elements"):
        load_tokenizer(_archive(tmp_path / "sets.ckpt", sets), config="tiny")
    calls = b"\x80\x02]" + ints + b"tq\x010cm\nC\nq\x020" + b"h\x02h\x01Ra" * 200 + b"."  # C(*100k ints) x 200
    tracemalloc.start()
    try:
        made = _RestrictedUnpickler(io.BytesIO(calls)).load()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(made) == 200 and kept < 8 << 20  # 200 copies of the tuple would be 160 MB


def test_a_byteorder_record_is_read_within_a_few_bytes(tmp_path):
    """A deflated byteorder record of 1 MiB (a 1 GiB one is 1 MiB on disk) is refused from its declared size."""
    import pickle

    empty = pickle.dumps({}, protocol=2)
    padded = _archive(tmp_path / "padded.ckpt", empty, byteorder=b"little" + b" " * ((1 << 20) - 6))
    with pytest.raises(CheckpointError, match="padded.ckpt: record archive/byteorder declares 1048576 bytes; at most"):
        load_tokenizer(padded, config="tiny")
    with pytest.raises(CheckpointError, match="big.ckpt: big-endian checkpoints are not supported"):
        load_tokenizer(_archive(tmp_path / "big.ckpt", empty, byteorder=b"big"), config="tiny")
    with pytest.raises(CheckpointError, match=r"odd.ckpt: its byteorder record holds b'\\xff'; expected b'little'"):
        load_tokenizer(_archive(tmp_path / "odd.ckpt", empty, byteorder=b"\xff"), config="tiny")


class _Storage:
    """Pickled as the persistent id `pid`, as torch.save writes a storage."""

    def __init__(self, pid):
        self.pid = pid


class _Record:
    """Pickled as a call of torch._utils._rebuild_tensor_v2 with `args` (and BUILD `state` when given)."""

    def __init__(self, *args, state=None):
        self.args, self.state = args, state

    def __reduce__(self):
        import torch._utils

        call = (torch._utils._rebuild_tensor_v2, self.args)
        return call if self.state is None else (*call, self.state)


def _crafted_checkpoint(path, tiny, record, records=None):
    """A Lightning-style checkpoint whose every model tensor is `record(shape, contiguous strides)`."""
    import io
    import pickle
    from collections import OrderedDict

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, _Storage) else None

    def strides(shape):
        return tuple(int(torch.tensor(shape[i + 1 :]).prod()) for i in range(len(shape)))

    state = {f"model.{k}": record(tuple(v.shape), strides(tuple(v.shape))) for k, v in tiny.state_dict().items()}
    state["model.step"] = OrderedDict()
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"state_dict": state})
    return _archive(path, buffer.getvalue(), records)


FLOATS = _Storage(("storage", torch.FloatStorage, "0", "cpu", 1 << 20))
LONG = [1] * 100_000  # one list, memoised: each record refers to it in two bytes


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (lambda s, st: _Record(7, 0, s, st, False, None), r"storage is not a storage reference \(got int\)"),
        (lambda s, st: _Record(FLOATS, 0, tuple(map(float, s)), st, False, None), "must be integers"),
        (lambda s, st: _Record(FLOATS, 0.0, s, st, False, None), "must be integers"),
        (lambda s, st: _Record(FLOATS, 0, LONG, st, False, None), "sequences of one length, at most 64"),
        (lambda s, st: _Record(FLOATS, 0, s, st[:-1], False, None), "sequences of one length"),
        (lambda s, st: _Record(FLOATS, 0, LONG, LONG, False, None), "sequences of one length, at most 64"),
        (
            lambda s, st: _Record(_Storage(("storage", torch.FloatStorage, "k" * 65, "cpu", 1)), 0, s, st),
            r"unsupported storage reference \(a tuple\); expected .* with a short key",
        ),
        (
            lambda s, st: _Record(_Storage(("storage", torch.FloatStorage, ["0"] * 1000, "cpu", 1)), 0, s, st),
            r"unsupported storage reference \(a tuple\)",
        ),
        (lambda s, st: _Record(FLOATS, 0, s, st, False, None, state={"storage": 7}), "gives state to a TensorRef"),
    ],
)
def test_a_malformed_tensor_record_is_a_clear_error(tiny, tmp_path, record, message):
    """Each field of a tensor record comes from the file: checked as the record is read, one line naming the file."""
    bad = _crafted_checkpoint(tmp_path / "bad.ckpt", tiny, record)
    with pytest.raises(CheckpointError, match=f"bad.ckpt: .*{message}") as error:
        load_tokenizer(bad, config="tiny")
    assert "\n" not in str(error.value)


def test_crafted_records_load_when_well_formed(tiny, tmp_path):
    """The crafting above is right: the same records with sound fields load (every tensor a view of one storage)."""
    numel = max(v.numel() for v in tiny.state_dict().values())
    storage = torch.arange(numel, dtype=torch.float32)
    sound = _Storage(("storage", torch.FloatStorage, "0", "cpu", numel))
    good = _crafted_checkpoint(
        tmp_path / "good.ckpt",
        tiny,
        lambda s, st: _Record(sound, 0, s, st, False, None),
        {"0": storage.numpy().tobytes()},
    )
    model = load_tokenizer(good, config="tiny")
    assert torch.equal(model.encoder.proj_in.bias, storage[: model.encoder.proj_in.bias.numel()])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool, torch.float8_e4m3fn])
def test_model_tensors_must_be_floating_point(tiny, tmp_path, dtype):
    """A complex tensor once loaded with its imaginary part dropped, an integer one failed inside torch: both are
    refused from the file's header or records, before any tensor is read, naming the tensor and its type (also a
    storage type the loader does not read, float8). Other tensors may be of any type."""
    import json

    from safetensors.torch import save_file

    state, config = {k: (v * 7).to(dtype).contiguous() for k, v in tiny.state_dict().items()}, tiny.config.to_dict()
    name = {torch.complex64: "C64", torch.int32: "I32", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3"}[dtype]
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"titok_fast": json.dumps({"config": config})})
    with pytest.raises(CheckpointError, match=rf"w.safetensors: tensor \S+ is {name}; expected one of \['F32'"):
        load_tokenizer(tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "m.ckpt")
    refused = (  # torch.save writes float8 tensors with a newer record, which the loader names and refuses
        r"entry \S+ is a tensor record of a kind titok-fast does not read \(torch._utils._rebuild_tensor_v3: float8 "
        r"or newer types\); expected a tensor of one of \['torch.float32'"
        if dtype == torch.float8_e4m3fn
        else rf"tensor \S+ is {dtype}; expected one of \[torch.float32"
    )
    with pytest.raises(CheckpointError, match=rf"m.ckpt: {refused}"):
        load_tokenizer(tmp_path / "m.ckpt", config="tiny")
    lightning_checkpoint(tmp_path / "ok.ckpt", tiny, extra={"loss_module.steps": torch.tensor(3).to(dtype)})
    assert torch.equal(
        load_tokenizer(tmp_path / "ok.ckpt", config="tiny").encoder.mask_token, tiny.encoder.mask_token + 1
    )


def test_a_corrupt_file_is_a_one_line_error_naming_it(tiny, tmp_path):
    """Parsers fail in their own words (zipfile, safetensors): the loader says which file, in one line."""
    lightning_checkpoint(tmp_path / "m.ckpt", tiny)
    data = bytearray((tmp_path / "m.ckpt").read_bytes())
    assert data[:4] == b"PK\x03\x04"
    data[:4] = b"XXXX"  # the first record's local header; the central directory still lists it
    (tmp_path / "m.ckpt").write_bytes(bytes(data))
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for path in (tmp_path / "m.ckpt", tmp_path / "w.safetensors"):
        with pytest.raises(CheckpointError, match=rf"^{path}: ") as error:
            load_tokenizer(path, config="tiny")
        assert "\n" not in str(error.value)


def test_a_v1_lightning_checkpoint_pickle_is_far_inside_the_bounds():
    """V1's tensors with EMA, Adam states, a discriminator and OmegaConf hyper-parameters (one-element tensors of the
    same ranks: the pickle does not depend on their sizes) use a small fraction of what the bounds allow."""
    import io
    import pickletools
    import zipfile

    from titok_fast.loading import MAX_PICKLE_BYTES, MAX_PICKLE_CLASSES, MAX_PICKLE_OPCODES
    from titok_fast.model import TiTok

    with torch.device("meta"):
        ranks = {k: v.dim() for k, v in TiTok("v1", backend="torch").state_dict().items()}
    state = {f"{p}{k}": torch.zeros([1] * r) for p in ("model.", "ema_model.") for k, r in ranks.items()}
    state.update({f"loss_module.disc.{i}.weight": torch.zeros(1, 1, 1, 1) for i in range(150)})
    adam = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)} for i in ranks}
    hyper = OmegaConf.create({"experiment": {f"k{i}": i for i in range(100)}, "model": {"fsq_levels": [7, 7, 7, 5, 5]}})
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "optimizer_states": [{"state": adam}], "hyper_parameters": hyper}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    opcodes = list(pickletools.genops(data))
    assert len(data) < MAX_PICKLE_BYTES / 20 and len(opcodes) < MAX_PICKLE_OPCODES / 20
    assert len({arg for op, arg, _ in opcodes if op.name == "GLOBAL"}) < MAX_PICKLE_CLASSES / 20


def _no_zip_directory(*args, **kwargs):
    raise AssertionError("zipfile read the archive's directory")


@pytest.mark.parametrize("entries", [8, 0x10000], ids=["end-record", "zip64-record"])
def test_an_archive_of_too_many_entries_is_refused_before_its_directory_is_read(tiny, tmp_path, monkeypatch, entries):
    """zipfile keeps every entry of an archive's central directory in memory: the count its end record declares
    (past 65535, in the Zip64 record) is checked first."""
    import zipfile

    from titok_fast import loading

    path = tmp_path / "many.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(entries):
            archive.writestr(f"archive/data/{i}", b"")
    monkeypatch.setattr(loading, "MAX_ARCHIVE_ENTRIES", entries - 1)
    monkeypatch.setattr(zipfile, "ZipFile", _no_zip_directory)
    with pytest.raises(CheckpointError, match=f"its archive declares {entries} entries; at most {entries - 1}"):
        load_tokenizer(path, config="tiny")


def _declaring_one_entry(path):
    """`path`, a zip archive, made to declare one entry in its end record (its directory left as it is)."""
    data = bytearray(path.read_bytes())
    assert data[-22:-18] == b"PK\x05\x06"
    data[-14:-10] = (1).to_bytes(2, "little") * 2  # entries on this disk, entries in all
    path.write_bytes(bytes(data))


def _with_zip64_record(path, entries):
    """`path`, a zip archive, given a Zip64 end record declaring `entries` (and the same directory) before its end
    record, which keeps its own count: zipfile takes the Zip64 record's numbers whenever there is one."""
    import struct

    data = path.read_bytes()
    size, offset = struct.unpack("<LL", data[-10:-2])
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(data) - 22, 1)
    path.write_bytes(data[:-22] + record + locator + data[-22:])


@pytest.mark.parametrize("crafted", ["directory-declared-as-one-entry", "zip64-record-behind-the-end-record"])
def test_a_directory_larger_than_its_declared_entries_is_refused_before_it_is_read(
    tiny, tmp_path, monkeypatch, crafted
):
    """zipfile reads the central directory by the size declared for it, whatever the count of entries says (186 MB
    of 3 million entries declared as one took 2 GB), and takes a Zip64 record's numbers over the end record's: both
    are checked as zipfile reads them, before it reads the directory."""
    import zipfile

    from titok_fast import loading

    path = tmp_path / "many.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(64):
            archive.writestr(f"archive/data/{i}", b"")
    size = int.from_bytes(path.read_bytes()[-10:-6], "little")
    if crafted == "directory-declared-as-one-entry":
        _declaring_one_entry(path)
        monkeypatch.setattr(loading, "MAX_ARCHIVE_DIRECTORY_BYTES", size - 1)
        message = f"its archive declares a central directory of {size} bytes; at most {size - 1}"
    else:
        _with_zip64_record(path, 64)
        _declaring_one_entry(path)
        monkeypatch.setattr(loading, "MAX_ARCHIVE_ENTRIES", 63)
        message = "its archive declares 64 entries; at most 63"
    with zipfile.ZipFile(path) as archive:  # the crafting is right: zipfile reads every entry
        assert len(archive.infolist()) == 64
    monkeypatch.setattr(zipfile, "ZipFile", _no_zip_directory)
    with pytest.raises(CheckpointError, match=f"^{path}: {message}$"):
        load_tokenizer(path, config="tiny")


def _attributes(function) -> dict:
    return {"__dict__": dict(vars(function)), "__kwdefaults__": function.__kwdefaults__}


@pytest.mark.parametrize(
    ("name", "state"),
    [
        (b"torch._utils\n_rebuild_tensor_v2", b"}X\x08\x00\x00\x00tamperedK\x01s"),  # into its __dict__
        (b"torch._utils\n_rebuild_parameter", b"N}X\x0e\x00\x00\x00__kwdefaults__}s\x86"),  # an attribute
        (b"collections\nOrderedDict", b"}X\x08\x00\x00\x00tamperedK\x01s"),
    ],
    ids=["function-dict", "function-attribute", "container"],
)
def test_a_pickle_cannot_give_state_to_what_it_may_call(tiny, tmp_path, name, state):
    """BUILD sets whatever attributes it is given on whatever it is given: handed titok-fast's own functions, a
    pickle changed them for the rest of the process. What the pickle may call is refused state, in one line; what
    it builds still takes its own (torch.save writes a state_dict, an OrderedDict, with a BUILD of its _metadata)."""
    from titok_fast import loading

    functions = (loading._rebuild_tensor, loading._rebuild_parameter)
    kept = [_attributes(f) for f in functions]
    bad = _archive(tmp_path / "b.ckpt", b"\x80\x02c" + name + b"\n" + state + b"b0}.")
    qualname = name.decode().replace("\n", ".")
    with pytest.raises(CheckpointError, match=f"^{bad}: the pickle gives state to {qualname}$"):
        load_tokenizer(bad, config="tiny")
    assert [_attributes(f) for f in functions] == kept
    torch.save(tiny.state_dict(), tmp_path / "bare.pt")
    assert torch.equal(load_tokenizer(tmp_path / "bare.pt", config="tiny").encoder.mask_token, tiny.encoder.mask_token)


def test_random_weights_take_only_seeds_a_token_file_can_record_and_leave_the_callers_random_numbers():
    from titok_fast.loading import random_seed, random_tokenizer

    model = random_tokenizer("tiny", seed=10**18 - 1)
    assert random_seed(model.weights_digest) == 10**18 - 1  # decode can rebuild it
    for seed in (-1, 10**18, 2**63, 1.5, True, torch.tensor(3)):  # 2**63 gave seed 0's weights under its own name
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 999999999999999999\]"):
            random_tokenizer("tiny", seed=seed)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_tokenizer("tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)
    # the weights of before, on x86 CPUs with AVX2 or AVX-512 (what torch's float32 random fills give there; torch's
    # scalar kernels, ATEN_CPU_CAPABILITY=default, draw others, which decode refuses by their digest)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert random_tokenizer("tiny", seed=7).weights_digest == "random-seed7-9341808e1c685b29"


def test_weights_that_record_no_config_are_read_as_v1_and_said_to_be(tiny, tmp_path, capsys):
    """An upstream checkpoint records no config: it is read as v1, and that is said (once a file): weights shaped as
    v1's but trained with other FSQ levels would otherwise load and give other tokens without a word. A config
    given, or one the file stores, says nothing; a config given that differs from the one stored is said."""
    from titok_fast.config import TiTokConfig

    lightning_checkpoint(tmp_path / "m.ckpt", tiny)
    _weights_with_metadata(tiny, tmp_path / "bare.safetensors", {})
    for name in ("m.ckpt", "bare.safetensors"):
        for _ in range(2):
            with pytest.raises(CheckpointError, match="missing tensor|unexpected|shape"):  # (tiny's shapes, not v1's)
                load_tokenizer(tmp_path / name)
        err = capsys.readouterr().err
        assert err.count("records no model config, so it is read as v1") == 1 and name in err, err
        load_tokenizer(tmp_path / name, config="tiny")
        assert capsys.readouterr().err == ""
    save_safetensors(tiny, tmp_path / "tiny.safetensors")
    load_tokenizer(tmp_path / "tiny.safetensors")
    load_tokenizer(tmp_path / "tiny.safetensors", config="tiny")
    assert capsys.readouterr().err == ""
    other = TiTokConfig(**{**tiny.config.__dict__, "fsq_levels": (8, 8, 6, 5, 5), "name": "custom"})
    model = load_tokenizer(tmp_path / "tiny.safetensors", config=other)
    assert model.config.fsq_levels == (8, 8, 6, 5, 5)  # the one given is used
    assert "the config given differs from the one it stores in fsq_levels [8, 8, 6, 5, 5] (stored [7, 5, 5, 5, 5])" \
        in capsys.readouterr().err
    grid = TiTokConfig(**{**tiny.config.__dict__, "max_grid": (8, 64, 64), "name": "custom"})
    load_tokenizer(tmp_path / "tiny.safetensors", config=grid)
    assert "differs from the one it stores in max_grid [8, 64, 64] (stored [12, 160, 160]); the one given is used" \
        in capsys.readouterr().err
