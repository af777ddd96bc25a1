from pathlib import Path

import pytest
import yaml

from fastssl.config import Config, ConfigError, describe, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 64\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert cfg.train.epochs == 3            # override beats YAML
    assert cfg.train.batch_size == 64       # YAML beats default
    assert cfg.model.proj_dim == Config().model.proj_dim


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  backbone: resnet18\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle.backbone'; did you mean 'model.backbone'"):
        load_config(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got 'big'"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"augment.crop_scale: expected a list of float"):
        load_config(None, ["augment.crop_scale=0.5"])
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got True"):
        load_config(None, {"train.epochs": True})


def test_int_is_accepted_for_float():
    assert load_config(None, ["method.simclr.temperature=1"]).method.simclr.temperature == 1.0


def test_duplicate_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'epochs' at line 3 \(first at line 2\)"):
        load_config(path)


def test_bad_values_name_the_key():
    for override, message in [("model.stem=huge", "model.stem: 'huge' is not one of"),
                              ("augment.flip_p=1.5", "augment.flip_p: a probability"),
                              ("augment.crop_scale=[0.9,0.1]", "augment.crop_scale: expected \\[min, max\\]"),
                              ("train.epochs=0", "train.epochs: must be > 0"),
                              ("augment.size=0", "augment.size: must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.epochs"])


def test_resume_accepts_bool_or_path():
    assert load_config(None, ["train.resume=true"]).train.resume is True
    assert load_config(None, ["train.resume=runs/x/last.pt"]).train.resume == "runs/x/last.pt"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_demo_config_resolves_for_every_method():
    from fastssl.methods import METHODS
    demo = Path(__file__).parent.parent / "configs" / "demo.yaml"
    optimisers = {name: load_config(demo, [f"method.name={name}"]).optim for name in METHODS}
    # The YAML anchor shares one optimiser among the sections that name it, and no others.
    shared = {name for name, o in optimisers.items() if (o.name, o.lr, o.weight_decay) == ("sgd", 0.05, 5e-4)}
    assert shared == {"byol", "simsiam", "dino"}
    assert optimisers["simclr"].name == optimisers["moco_v3"].name == "lars"


def test_imagenet_config_has_the_paper_settings():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "simclr_resnet50_imagenet.yaml")
    assert (cfg.train.batch_size, cfg.optim.name, cfg.optim.lr, cfg.optim.lr_scaling) == (4096, "lars", 0.3, "linear")
    assert (cfg.optim.weight_decay, cfg.method.simclr.temperature, cfg.optim.warmup_epochs) == (1e-6, 0.1, 10)
    assert (cfg.model.backbone, cfg.model.proj_hidden_dim, cfg.model.proj_dim) == ("resnet50", 2048, 128)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=5", "augment.crop_scale=[0.2,1]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["train"]["epochs"] == 5


def test_every_field_is_documented():
    text = describe()
    assert "train.epochs = 100\n    Number of pre-training epochs." in text
    undocumented = [line for line in text.splitlines() if line.strip() == ""]
    assert not undocumented


def test_new_keys_validate_and_name_the_key():
    cfg = load_config(None, ["train.resume=auto", "train.checkpoint_every_steps=100", "optim.impl=reference",
                             "optim.name=adamw", "eval.knn_every_epochs=5", "train.grad_clip=1.0"])
    assert (cfg.train.resume, cfg.train.checkpoint_every_steps, cfg.optim.impl) == ("auto", 100, "reference")
    assert (cfg.train.max_nonfinite_steps, cfg.train.sync_bn, cfg.eval.linear_epochs) == (5, True, 100)
    for override, message in [("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps: must be >= 0"),
                              ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps: must be > 0"),
                              ("train.grad_clip=-1", "train.grad_clip: must be >= 0"),
                              ("eval.linear_epochs=0", "eval.linear_epochs: must be > 0"),
                              ("eval.knn_every_epochs=-2", "eval.knn_every_epochs: must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_per_method_section_applies_to_its_method_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 2.0}\nper_method:\n  rotation:\n    optim: {name: sgd, lr: 0.1}\n")
    assert load_config(path).optim.lr == 2.0                                          # simclr: the file
    rotation = load_config(path, ["method.name=rotation"]).optim
    assert (rotation.name, rotation.lr) == ("sgd", 0.1)
    assert load_config(path, ["method.name=rotation", "optim.lr=0.3"]).optim.lr == 0.3   # the command line wins
    path.write_text("method: {name: rotation}\nper_method:\n  rotation:\n    optim: {lr: 0.1}\n")
    assert load_config(path).optim.lr == 0.1                                          # the file's method.name
    for text, message in [("per_method:\n  swav: {}\n", r"per_method.swav: not a method"),
                          ("per_method:\n  simclr:\n    optim: {lrr: 1}\n",
                           r"per_method.simclr: unknown config key 'optim.lrr'"),
                          ("per_method:\n  simclr:\n    method: {name: byol}\n",
                           r"per_method.simclr: cannot set method.name"),
                          ("per_method: [1]\n", r"per_method: expected a mapping")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)
