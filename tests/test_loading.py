"""Loading weights: Lightning checkpoints without running their code, safetensors with the config inside."""

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from titok_fast.loading import CheckpointError, convert, load_tokenizer, read_safetensors_metadata, save_safetensors

from helpers import make_model, rel_l2


class RunsACommand:
    """Unpickling this with a normal unpickler would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


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


def test_missing_and_misshaped_tensors_are_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["decoder.ln_pre.bias"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="missing tensor decoder.ln_pre.bias"):
        load_tokenizer(tmp_path / "missing.ckpt", config="tiny")
    state = dict(tiny.state_dict())
    state["encoder.proj_out.weight"] = torch.zeros(4, 512)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match=r"encoder.proj_out.weight has shape \[4, 512\], expected \[5, 512\]"):
        load_tokenizer(tmp_path / "shape.ckpt", config="tiny")
    with pytest.raises(CheckpointError, match="unexpected tensor|missing tensor"):
        load_tokenizer(tmp_path / "shape.ckpt", config="v1")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        load_tokenizer(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "absent.ckpt")


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


def test_convert_cli(tiny, tmp_path):
    lightning_checkpoint(tmp_path / "m.ckpt", tiny)
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "titok_fast.cli", "convert", str(tmp_path / "m.ckpt"), str(out), "--config", "tiny"]
    subprocess.run([*cmd, "--no-ema"], check=True, capture_output=True)
    assert torch.equal(load_tokenizer(out).encoder.mask_token, tiny.encoder.mask_token)
    bad = subprocess.run([*cmd[:4], str(tmp_path / "nope.ckpt"), str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_save_safetensors_round_trip(tiny, tmp_path):
    save_safetensors(tiny, tmp_path / "w.safetensors")
    model = load_tokenizer(tmp_path / "w.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.state_dict().items())
    fp8 = load_tokenizer(tmp_path / "w.safetensors", precision="fp8")  # the same weights, FP8 linears
    assert fp8.precision == "fp8" and model.precision == "default"
    assert all(torch.equal(fp8.state_dict()[k], v) for k, v in tiny.state_dict().items())
    x = torch.randn(5, fp8.config.encoder.width)
    layer = fp8.encoder.model_layers.attn_layer[0].to_qkv
    assert 0 < rel_l2(layer(x), model.encoder.model_layers.attn_layer[0].to_qkv(x)) < 0.05  # the loaded weights


def test_tampered_archive_is_a_clear_error(tiny, tmp_path):
    import zipfile

    lightning_checkpoint(tmp_path / "m.ckpt", tiny, ema=False)
    with zipfile.ZipFile(tmp_path / "m.ckpt") as src, zipfile.ZipFile(tmp_path / "cut.ckpt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item.filename.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match=r"storage record .*data/0 holds 1024 bytes; needs 2048"):
        load_tokenizer(tmp_path / "cut.ckpt", config="tiny")


def test_compiled_model_prefix_is_stripped(tiny, tmp_path):
    state = {f"model._orig_mod.{k}": v for k, v in tiny.state_dict().items()}
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
        ("tokenizer.model.fsq_levels", [1000] * 5, r"fsq_levels \[1000, 1000, 1000, 1000, 1000\] exceed 256"),
        ("tokenizer.model.fsq_levels", [200, 200, 2, 2, 2], "make 320000 codes; at most 32768"),
        ("training.sampling.max_grid", [20, 100000, 192], r"max_grid \[20, 100000, 192\] exceeds"),
        ("training.sampling.num_token_range", [128, 1 << 30], "must be increasing and at most 65536"),
        ("training.sampling.num_token_range", [1024, 128], "must be increasing"),
    ],
)
def test_config_sizes_in_a_file_are_bounded_before_anything_is_built(tiny, tmp_path, field, value, message):
    """Five levels match the weights' shapes whatever their values: only a limit stops a 1e15-entry table; grids
    and token ranges size what the CLI allocates by default."""
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
    """A failed write leaves the old file and no temporary one."""
    import safetensors.torch

    save_safetensors(tiny, tmp_path / "w.safetensors")
    before = (tmp_path / "w.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("titok_fast.loading.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(tiny, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    assert safetensors.torch.load_file(tmp_path / "w.safetensors")
