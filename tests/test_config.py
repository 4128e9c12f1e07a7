"""core.config: construction-time validation with one-line messages naming field, value, allowed."""

import pytest

from core.config import DataConfig, PretrainConfig, SegmentConfig
from core.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    for cls in (DataConfig, PretrainConfig, SegmentConfig):
        cfg = cls()
        assert cls.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "cls,d,needle",
    [
        (PretrainConfig, {"lamda": 0.1}, "unknown field(s) lamda; allowed fields:"),
        (PretrainConfig, {"method": "simclr"}, "method='simclr' is not allowed; choose one of: barlow_twins, dino, vicreg"),
        (PretrainConfig, {"barlow_twins": {"lambd": -0.1}}, "barlow_twins.lambd=-0.1 must be >= 0"),
        (PretrainConfig, {"dino": {"out_dim": 0}}, "dino.out_dim=0 must be > 0"),
        (PretrainConfig, {"dino": {"momentum": 1.5}}, "dino.momentum=1.5 must be between 0.0 and 1.0"),
        (PretrainConfig, {"vicreg": {"std_coeff": -1}}, "vicreg.std_coeff=-1.0 must be >= 0"),
        (PretrainConfig, {"vicreg": {"sim_coeff": "x"}}, "vicreg.sim_coeff='x' must be a number"),
        (PretrainConfig, {"dino": {"teacher": 1}}, "DINOOptions: unknown field(s) teacher"),
        (PretrainConfig, {"epochs": "ten"}, "PretrainConfig.epochs='ten' must be an integer"),
        (PretrainConfig, {"lr": "fast"}, "PretrainConfig.lr='fast' must be a number"),
        (PretrainConfig, {"batch_size": 1}, "batch_size=1 must be >= 2"),
        (PretrainConfig, {"source": "imagenet21k"}, "source='imagenet21k' is not a weight source"),
        (PretrainConfig, {"barlow_twins": {"lambd": float("nan")}}, "must be a finite number"),
        (PretrainConfig, {"data": {"crop_scale_min": 0.0}}, "data.crop_scale_min=0.0 must be between 0.01 and 1.0"),
        (PretrainConfig, {"data": {"crop_scale_min": "big"}}, "data.crop_scale_min='big' must be a number"),
        (PretrainConfig, {"data": {"corrupt_policy": "ignore"}}, "data.corrupt_policy='ignore' is not allowed"),
        (PretrainConfig, {"data": "voc"}, "must be a mapping of DataConfig fields"),
        (SegmentConfig, {"fusion": "both"}, "fusion='both' is not allowed; choose one of: none, features, affinity"),
        (SegmentConfig, {"evaluation": "E9"}, "evaluation='E9' is not allowed"),
        (SegmentConfig, {"slide_crop": 32, "slide_stride": 48}, "slide_stride=48 must be <= slide_crop=32"),
        (SegmentConfig, {"fusion_alpha": 1.5}, "fusion_alpha=1.5 must be between 0.0 and 1.0"),
        (SegmentConfig, {"head_channels": 0}, "head_channels=0 is not allowed; choose a positive integer"),
        (SegmentConfig, {"head_channels": "wide"}, "SegmentConfig.head_channels='wide' must be an integer"),
        (SegmentConfig, {"head": "deeplabv3", "head_channels": 64},
         "head_channels=64 sets the width of the head's convolutions but head='deeplabv3' has no such width; leave "
         "head_channels unset (none) or choose head=setr_naive | setr_pup | setr_mla | segformer"),
    ],
)
def test_bad_values_give_one_line_naming_field_value_and_choices(cls, d, needle):
    with pytest.raises(ConfigError) as e:
        cls.from_dict(d)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_coercion_from_yaml_and_cli_strings():
    cfg = PretrainConfig.from_dict({"epochs": "3", "barlow_twins": {"lambd": "0.02"}, "projector": "256-128",
                                    "compile": "true", "lr": None})
    assert cfg.epochs == 3 and cfg.barlow_twins.lambd == 0.02 and cfg.projector == (256, 128) and cfg.compile is True
    assert cfg.lr is None  # an explicit null selects the optimiser's official recipe


def test_head_channels_default_none_coerced_and_recorded():
    assert SegmentConfig().head_channels is None and SegmentConfig().to_dict()["head_channels"] is None
    cfg = SegmentConfig.from_dict({"head_channels": "64"})  # CLI / YAML string
    assert cfg.head_channels == 64 and cfg.to_dict()["head_channels"] == 64  # config.json records it
    assert SegmentConfig.from_dict(cfg.to_dict()) == cfg
    assert SegmentConfig(head="segformer", head_channels=32).head_channels == 32


def test_ssl_crop_scale_defaults():
    assert DataConfig().ssl_crop_scale() == (0.25, 1.0)  # generated 64 px data
    assert DataConfig(root="/data").ssl_crop_scale() == (0.08, 1.0)  # official recipe on real data
    assert DataConfig(root="/data", crop_scale_min=0.2).ssl_crop_scale() == (0.2, 1.0)


def test_generated_root_given_explicitly_keeps_the_generated_crop_scale(voc_root, tmp_path):
    # `python -m core.data.synthetic --out X` then `--data-root X`: same views as the default cache
    for root in (voc_root, voc_root / "VOCdevkit" / "VOC2012"):
        assert DataConfig(root=str(root)).is_generated_root()
        assert DataConfig(root=str(root)).ssl_crop_scale() == (0.25, 1.0)
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)  # a real-looking tree without the marker
    assert not DataConfig(root=str(tmp_path)).is_generated_root()
    assert DataConfig(root=str(tmp_path)).ssl_crop_scale() == (0.08, 1.0)


def test_every_method_has_a_config_section_and_options_follow_the_method():
    from core.methods.registry import ssl_methods

    cfg = PretrainConfig()
    for name, spec in ssl_methods().items():
        assert isinstance(getattr(cfg, name), spec.options)  # one section per registered method
        c = PretrainConfig(method=name)
        assert c.options is getattr(c, name)
    d = PretrainConfig.from_dict({"method": "dino", "dino": {"out_dim": 64}}).to_dict()
    assert d["dino"]["out_dim"] == 64 and PretrainConfig.from_dict(d).dino.out_dim == 64  # nested round trip


def test_every_field_has_a_doc():
    """Each field's help text (the CLI's --help) comes from its attribute docstring or metadata."""
    import dataclasses

    from core.config_cli import field_help

    seen = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for f in dataclasses.fields(cls):
            assert field_help(cls, f), f"{cls.__name__}.{f.name} has no doc"
            if dataclasses.is_dataclass(f.type) and not isinstance(f.type, str):
                walk(f.type)

    import typing

    for cls in (PretrainConfig, SegmentConfig):
        walk(cls)
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp)


# --------------------------------------------------------------------------- shared run settings
def _shared_names():
    import dataclasses

    from core.config import RunSettings

    return [f.name for f in dataclasses.fields(RunSettings)]


def test_shared_run_settings_are_declared_once():
    """Every RunSettings field is a field of both stages with RunSettings' type, metadata and doc; the ones
    RunSettings gives a default keep it in both stages (one default), and no stage class declares a shared
    field itself (its source holds a `shared()` placeholder, not a second annotation)."""
    import ast
    import dataclasses
    import inspect

    from core.config import PretrainSettings, RunSettings
    from core.config_cli import field_docs

    base = {f.name: f for f in dataclasses.fields(RunSettings)}
    assert {"backbone", "source", "epochs", "batch_size", "weight_decay", "precision", "device", "devices",
            "compile", "seed", "diagnostics_every", "wandb", "keep_checkpoints", "data"} <= set(base)
    for cls in (PretrainConfig, SegmentConfig):
        assert issubclass(cls, RunSettings)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, b in base.items():
            f = fields[name]
            assert f.type == b.type and dict(f.metadata) == dict(b.metadata), (cls.__name__, name)
            if b.default is not dataclasses.MISSING:
                assert f.default == b.default, (cls.__name__, name)
            assert field_docs(cls)[name] == field_docs(RunSettings)[name]
    for cls in (PretrainSettings, SegmentConfig):
        tree = ast.parse(inspect.getsource(cls).lstrip())
        own = {n.target.id for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        assert not own & set(base), f"{cls.__name__} redeclares {sorted(own & set(base))}; use name = shared()"


def test_stage_defaults_of_shared_fields():
    """Fields whose sensible default differs between the stages have one default per stage, none in the base."""
    import dataclasses

    from core.config import RunSettings

    nodefault = {f.name for f in dataclasses.fields(RunSettings)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert nodefault == {"epochs", "batch_size", "weight_decay"}
    p, s = PretrainConfig(), SegmentConfig()
    assert (p.epochs, p.batch_size, p.weight_decay) == (20, 32, 1.5e-6)
    assert (s.epochs, s.batch_size, s.weight_decay) == (8, 16, 1e-4)
    with pytest.raises(TypeError):
        RunSettings()  # not a run: a stage gives the missing defaults


def test_field_order_keeps_the_stage_layout():
    """Shared fields sit among each stage's own fields (config.json and --help order), not first."""
    import dataclasses

    seg = [f.name for f in dataclasses.fields(SegmentConfig)]
    pre = [f.name for f in dataclasses.fields(PretrainConfig)]
    assert seg[:3] == ["evaluation", "backbone", "head"] and seg[-1] == "data"
    assert pre[:4] == ["method", "backbone", "source", "projector"]
    assert pre.index("data") + 1 == pre.index("barlow_twins")  # the method sections after the settings
    assert list(SegmentConfig().to_dict()) == seg and list(PretrainConfig().to_dict()) == pre
    assert seg.index("epochs") < seg.index("lr") < seg.index("weight_decay") < seg.index("batch_size")


def test_stage_config_refuses_a_misplaced_shared_field():
    from core.config import RunSettings, shared, stage_config

    with pytest.raises(TypeError, match="RunSettings has no field 'nope'"):
        @stage_config
        class Bad(RunSettings):
            nope = shared()

    with pytest.raises(TypeError, match="place the shared field"):
        @stage_config
        class Missing(RunSettings):
            epochs = shared(default=1)

    with pytest.raises(TypeError, match="declares no default"):
        names = {n: shared() for n in _shared_names()}
        stage_config(type("NoDefault", (RunSettings,), dict(names)))


@pytest.mark.parametrize("cls,d,needle", [
    (PretrainConfig, {"precision": "64"}, "precision='64' is not allowed; choose one of: 32, bf16-mixed, 16-mixed"),
    (SegmentConfig, {"precision": "64"}, "precision='64' is not allowed; choose one of: 32, bf16-mixed, 16-mixed"),
    (SegmentConfig, {"device": "tpu"}, "device='tpu' is not allowed; choose one of: auto, cpu, cuda"),
    (PretrainConfig, {"wandb": "cloud"}, "wandb='cloud' is not allowed; choose one of: offline, online, disabled"),
    (SegmentConfig, {"devices": 0}, "devices=0 must be > 0"),
    (SegmentConfig, {"weight_decay": -1}, "weight_decay=-1.0 is out of range: it must be >= 0 and <= 100"),
    (PretrainConfig, {"diagnostics_every": -1}, "diagnostics_every=-1 must be >= 0"),
    (SegmentConfig, {"batch_size": 0}, "batch_size=0 is out of range: it must be >= 1 and <= 65536"),
    (PretrainConfig, {"seed": -1}, "seed=-1 is out of range: it must be >= 0 and <= 4294967295"),
    (SegmentConfig, {"seed": 2**32}, "seed=4294967296 is out of range: it must be >= 0 and <= 4294967295"),
    (PretrainConfig, {"epochs": 10**30}, f"epochs={10**30} is out of range: it must be >= 1 and <= 100000"),
    (PretrainConfig, {"batch_size": 10**21}, f"batch_size={10**21} is out of range: it must be >= 1 and <= 65536"),
    (SegmentConfig, {"lr": 1e308}, "lr=1e+308 is out of range: it must be > 0 and <= 1e+06"),
    (PretrainConfig, {"lr": 0}, "lr=0.0 is out of range: it must be > 0 and <= 1e+06"),
    (SegmentConfig, {"max_iters": 10**9}, "max_iters=1000000000 is out of range: it must be >= 1 and <= 100000000"),
    (SegmentConfig, {"data": {"synthetic_seed": -3}}, "data.synthetic_seed=-3 is out of range"),
])
def test_shared_fields_are_validated_in_both_stages(cls, d, needle):
    with pytest.raises(ConfigError) as e:
        cls.from_dict(d)
    assert needle in str(e.value)


@pytest.mark.parametrize("script", ["experiments/pretrain.py", "experiments/segment.py"])
def test_help_lists_the_shared_fields_with_their_stage_default(script):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, script, "--help"], cwd=repo, capture_output=True, text=True,
                         timeout=120).stdout
    text = " ".join(out.split())
    defaults = {"experiments/pretrain.py": {"epochs": 20, "batch-size": 32}, "experiments/segment.py":
                {"epochs": 8, "batch-size": 16}}[script]
    for name in ("backbone", "source", "precision", "device", "devices", "seed", "diagnostics-every", "wandb",
                 "keep-checkpoints", "data-image-size"):
        assert f"--{name} " in text, name
    assert f"--epochs INT Training epochs. (default: {defaults['epochs']})" in text
    assert (f"--batch-size INT Images per batch per device (the global batch under DDP is devices x batch_size). "
            f"(default: {defaults['batch-size']})") in text


@pytest.mark.parametrize("cls_name,d,field", [
    ("PretrainConfig", {"dino": {"norm_last_layer": "maybe"}}, "norm_last_layer"),
    ("PretrainConfig", {"dino": {"norm_last_layer": 1}}, "norm_last_layer"),
    ("SegmentConfig", {"head_input_norm": "perhaps"}, "head_input_norm"),
    ("SegmentConfig", {"head_input_norm": 3}, "head_input_norm"),
    ("PretrainConfig", {"attn_eval_size": 480.5}, "attn_eval_size"),
])
def test_new_study_fields_refuse_bad_values_in_one_line(cls_name, d, field):
    """The fields the study's fidelity added (DINO's norm_last_layer, the SETR head's input norm, the attention
    Jaccard's resolution) refuse a value of the wrong type in one line naming the field and the value."""
    import core.config as config

    with pytest.raises(ConfigError) as e:
        getattr(config, cls_name).from_dict(d)
    msg = str(e.value)
    assert field in msg and "\n" not in msg
