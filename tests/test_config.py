import re

import pytest
import yaml
from omegaconf import OmegaConf

from titok_fast import PRESETS, TiTokConfig
from titok_fast.config import SIZES, StackSize

TINY_YAML = {
    "tokenizer": {
        "model": {"patch_size": [4, 8, 8], "fsq_levels": [7, 5, 5, 5, 5], "encoder_size": "tiny_thin",
                  "decoder_size": "tiny_thin", "unrelated": 3},
    },
    "training": {"sampling": {"max_grid": [12, 160, 160], "num_token_range": [64, 384]}, "lr": 1e-4},
}  # fmt: skip


def test_v1_numbers_match_spec():
    v1 = PRESETS["v1"]
    assert v1.codebook_size == 8575
    assert (v1.encoder.width, v1.decoder.width) == (1024, 2048)
    assert (v1.encoder.ffn_inner, v1.decoder.ffn_inner) == (1376, 2752)
    assert v1.patch_dim == 768


@pytest.mark.parametrize("name", sorted(SIZES))
def test_size_table_width_is_64_per_q_head(name):
    size = StackSize.named(name)
    assert size.width == 64 * size.q_heads
    assert size.q_heads % size.kv_heads == 0
    assert size.ffn_inner % 32 == 0


@pytest.mark.parametrize("source", ["preset", "dict", "omegaconf", "yaml"])
def test_from_any_reads_every_form(source, tmp_path):
    if source == "preset":
        cfg = TiTokConfig.from_any("tiny")
    elif source == "dict":
        cfg = TiTokConfig.from_any(TINY_YAML)
    elif source == "omegaconf":
        cfg = TiTokConfig.from_any(OmegaConf.create(TINY_YAML))
    else:
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(TINY_YAML))
        cfg = TiTokConfig.from_any(str(path))
    assert cfg == PRESETS["tiny"]
    assert cfg.name == "tiny"
    assert TiTokConfig.from_any(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["tokenizer"]["model"].pop("fsq_levels"), "tokenizer.model.fsq_levels"),
        (lambda d: d["training"].pop("sampling"), "training.sampling"),
        (lambda d: d["tokenizer"]["model"].update(encoder_size="huge"), "encoder_size: unknown model size 'huge'"),
        (lambda d: d["tokenizer"]["model"].update(patch_size=[4, 8]), "patch_size"),
        (lambda d: d["tokenizer"]["model"].update(fsq_levels=[7, 1]), "fsq_levels"),
        (lambda d: d["training"]["sampling"].update(max_grid="big"), "max_grid"),
    ],
)
def test_from_any_names_the_bad_field(mutate, message, tmp_path):
    """And the file, for a YAML file (upstream's own small.yaml lacks a field, said without its name before)."""
    import copy

    import yaml

    d = copy.deepcopy(TINY_YAML)
    mutate(d)
    with pytest.raises(ValueError, match=message):
        TiTokConfig.from_any(d)
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match=f"^config file {re.escape(repr(str(tmp_path / 'mine.yaml')))}: .*{message}"):
        TiTokConfig.from_any(str(tmp_path / "mine.yaml"))


def test_from_any_rejects_unknown_preset_and_types():
    with pytest.raises(ValueError, match="neither a preset"):
        TiTokConfig.from_any("v9")
    with pytest.raises(TypeError, match="config must be"):
        TiTokConfig.from_any(42)


def test_flop_counts_match_spec():
    v1 = PRESETS["v1"]
    assert v1.encoder.flops([3904]) == pytest.approx(0.82e12, rel=0.02)  # 20x192x192, 1024 tokens
    assert v1.encoder.flops([2880 + 256]) == pytest.approx(0.58e12, rel=0.02)
    assert v1.decoder.flops([3904]) == pytest.approx(2.72e12, rel=0.02)


def test_direct_construction_takes_lists():
    assert TiTokConfig(fsq_levels=[7, 7, 7, 5, 5], max_grid=[20, 192, 192]) == PRESETS["v1"]


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['touch {marker}']\n",  # a tag that would run code under an unsafe loader
        "a: [1, 2\nb: {{\n",  # broken YAML, whose parser's message spans several lines
        "\xff\xfe not utf-8",
        "a: " + "[" * 50_000,  # nesting past Python's recursion limit
        "a: " + "9" * 5000,  # an integer past Python's digit limit
    ],
    ids=["python-tag", "broken", "not-utf-8", "deep-nesting", "huge-number"],
)
def test_a_yaml_config_that_is_not_plain_data_is_one_line_and_runs_nothing(tmp_path, text):
    path, marker = tmp_path / "bad.yaml", tmp_path / "ran"
    path.write_bytes(text.format(marker=marker).encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad.yaml' is not a plain YAML config \(") as raised:
        TiTokConfig.from_any(str(path))
    assert "\n" not in str(raised.value) and not marker.exists()


def test_a_yaml_config_cannot_take_long_or_much_memory(tmp_path):
    """Aliases nesting a list 9 deep, 9 times each (a few hundred bytes), were expanded whole by the error
    message's repr (gigabytes); a base-60 number (YAML 1.1's ``1:59:59``) takes time that grows with the square of
    its length to convert, so it is read as a string (as YAML 1.2 reads it), and refused as a field's value; a file
    over MAX_CONFIG_BYTES is refused unread; a FIFO is refused, not waited on."""
    import copy
    import os

    from titok_fast.config import MAX_CONFIG_BYTES

    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    model = yaml.safe_dump(TINY_YAML).replace("encoder_size: tiny_thin", "encoder_size: *a9")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(laughs) + "\n" + model)
    with pytest.raises(ValueError, match=r"encoder_size must be a size name, got \[\[\[") as raised:
        TiTokConfig.from_any(str(path))
    assert len(str(raised.value)) < 300
    sexagesimal = tmp_path / "base60.yaml"
    config = copy.deepcopy(TINY_YAML)
    config["tokenizer"]["model"]["patch_size"] = ["BASE60"]
    sexagesimal.write_text(yaml.safe_dump(config).replace("BASE60", "1:59:59"))
    with pytest.raises(ValueError, match=r"patch_size must be a list of positive integers below 2\*\*31, got \('1:59"):
        TiTokConfig.from_any(str(sexagesimal))
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * MAX_CONFIG_BYTES + b"\n" + yaml.safe_dump(TINY_YAML).encode())
    with pytest.raises(ValueError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        TiTokConfig.from_any(str(big))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="nor an existing YAML file"):
        TiTokConfig.from_any(str(fifo))
    hexadecimal = tmp_path / "hex.yaml"  # (read past Python's digit limit, which its repr would raise)
    hexadecimal.write_text(yaml.safe_dump(config).replace("BASE60", "0x" + "f" * 5000))
    with pytest.raises(ValueError, match=r"patch_size must be a list of positive integers below 2\*\*31, got "
                                         r"\(<an integer of 20000 bits>,\)$"):  # fmt: skip
        TiTokConfig.from_any(str(hexadecimal))


def test_a_yaml_config_has_no_merge_keys(tmp_path):
    """PyYAML copies merged mappings anew at every level of merges (a 0.8 KB config of 14 levels: gigabytes): a merge
    key (``<<``, or an explicit ``!!merge``) is refused in one line before anything is merged (YAML 1.2 has none);
    ``=`` keys, which the same step of PyYAML's reads, still are plain keys."""
    model = TINY_YAML["tokenizer"]["model"]
    sizes = {k: model[k] for k in ("encoder_size", "decoder_size")}
    rest = yaml.safe_dump({**TINY_YAML, "tokenizer": {"model": {k: v for k, v in model.items() if k not in sizes}}})
    merged = tmp_path / "merged.yaml"
    anchored = "sizes: &sizes {" + ", ".join(f"{k}: {v}" for k, v in sizes.items()) + "}\n"
    merged.write_text(anchored + rest.replace("model:\n", "model:\n    <<: *sizes\n"))
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(merged.read_text().replace("<<:", "!!merge <<:"))
    for path in (merged, explicit):
        with pytest.raises(ValueError, match=rf"{path.name}' is not a plain YAML config \(merge keys \(<<\) are not "
                                             "read: write the fields out"):  # fmt: skip
            TiTokConfig.from_any(str(path))
    levels = ["a0: &a0 {x: 1}"] + [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 4)}], k{i}: 1}}" for i in
                                   range(1, 15)]  # fmt: skip
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")  # (4**14 entries, were it merged)
    with pytest.raises(ValueError, match="merge keys"):
        TiTokConfig.from_any(str(bomb))
    equals = tmp_path / "equals.yaml"
    equals.write_text(yaml.safe_dump(TINY_YAML) + "extra: {=: 1}\n")
    assert TiTokConfig.from_any(str(equals)) == TiTokConfig.from_any(TINY_YAML)


def test_a_yaml_config_resolves_interpolations_of_other_fields_as_omegaconf_does(tmp_path):
    """Upstream reads its YAML with OmegaConf, which resolves ``${a.b}`` and ``${.b}`` links: a YAML path gives
    the config OmegaConf's object gives. A resolver (``${oc.env:...}``), text around a link, a link to nothing and
    a loop of links are each one line, and nothing is read from the environment."""
    model = dict(TINY_YAML["tokenizer"]["model"], decoder_size="${.encoder_size}", fsq_levels="${shared.levels}",
                 patch_size=[4, "${training.sampling.depth}", 8])  # fmt: skip
    sampling = dict(TINY_YAML["training"]["sampling"], depth=8, max_grid="${..grid}")
    config = {"tokenizer": {"model": model}, "training": {"sampling": sampling, "grid": [12, 160, 160]},
              "shared": {"levels": "${shared.real}", "real": [7, 5, 5, 5, 5]}}  # fmt: skip
    path = tmp_path / "linked.yaml"
    path.write_text(yaml.safe_dump(config))
    assert TiTokConfig.from_any(str(path)) == TiTokConfig.from_any(OmegaConf.load(path)) == PRESETS["tiny"]
    # a list item's link to a field whose own link is relative (to that field's node); a node that is a link; a
    # link on the way to a node (tokenizer: ${t}), and to a field (${q.model.depth}, q: ${shared})
    shared = {**config["shared"], "depth": "${.eight}", "eight": 8, "model": dict(model, patch_size=[4, 8, 8])}
    for linked in ({**config, "tokenizer": {"model": dict(model, patch_size=[4, "${shared.depth}", 8])},
                    "shared": shared},
                   {**config, "tokenizer": {"model": "${shared.model}"}, "shared": shared},
                   {**config, "tokenizer": "${t}", "t": {"model": "${shared.model}"}, "shared": shared},
                   {**config, "tokenizer": {"model": dict(model, patch_size=[4, "${q.depth}", 8])}, "q": "${shared}",
                    "shared": shared}):  # fmt: skip
        path.write_text(yaml.safe_dump(linked))
        assert TiTokConfig.from_any(str(path)) == TiTokConfig.from_any(OmegaConf.load(path)) == PRESETS["tiny"]
    for value, message in [
        ("${oc.env:HOME}", r"decoder_size holds '\$\{oc.env:HOME\}': only a field's interpolation"),
        ("tiny_${.x}", r"decoder_size holds 'tiny_\$\{.x\}'"),
        ("${.nothing}", r"missing field \(interpolated by tokenizer.model.decoder_size\) tokenizer.model.nothing"),
        ("${....x}", r"decoder_size: the interpolation \$\{....x\} goes above the config's top"),
        ("${shared.a}", r"by tokenizer.model.decoder_size\) shared.\w: more than 64 interpolations \(a loop\?\)$"),
        ("${shared.c}", r"by shared.c\) shared.c: more than 64 interpolations"),  # (a list of itself)
        ("${shared.l0}", r"by shared.l\d+\) shared.l\d+: more than 64 interpolations"),  # (10**8 links: bounded)
        ("${" + ".a" * 400_000 + "}", r"decoder_size\) tokenizer\.model\.[a.]{81}\.\.\.$"),  # (a link of 800 KB,
        ("${" + "a." * 400_000 + "a}", r"decoder_size\) [a.]{97}\.\.\.$"),  # said in 100 characters)
    ]:
        loops = {"a": "${shared.b}", "b": "${shared.a}", "c": ["${shared.c}"],
                 **{f"l{i}": [f"${{shared.l{i + 1}}}"] * 10 for i in range(8)}, "l8": 1}  # fmt: skip
        looped = {**config, "shared": {**config["shared"], **loops}}
        looped["tokenizer"] = {"model": {**model, "decoder_size": value}}
        path.write_text(yaml.safe_dump(looped))
        with pytest.raises(ValueError, match=message) as raised:
            TiTokConfig.from_any(str(path))
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "field, value",
    [("patch_size", (0, 8, 8)), ("max_grid", (0, 192, 192)), ("num_token_range", (0, 1024)),
     ("fsq_levels", (True, 5)), ("patch_size", (4, 8, 2**31))],
)  # fmt: skip
def test_config_integers_are_positive_ints_below_2_31(field, value):
    """A zero patch size passed here and failed later on a bare ZeroDivisionError (a stranger's metadata); True is
    no level (it would count as 1)."""
    with pytest.raises(ValueError, match=f"config field {field} must be a list of positive integers below 2\\*\\*31"):
        TiTokConfig(**{field: value})
