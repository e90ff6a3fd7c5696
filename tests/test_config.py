import pytest
import yaml

from amess.config import Config, parse_overrides


def test_overrides_are_typed_and_checked():
    c = Config().override(parse_overrides(["train.lr=1e-4", "train.max_steps=3", "amess.text_view=false",
                                           "train.seeds=[0, 1]", "train.encoder_lr=null"]))
    assert c.train.lr == 1e-4 and isinstance(c.train.lr, float)  # YAML alone reads 1e-4 as a string
    assert c.train.max_steps == 3 and c.amess.text_view is False and c.train.seeds == [0, 1]
    assert c.train.encoder_lr is None
    with pytest.raises(ValueError, match="train.lr: expected a number"):
        Config().override({"train.lr": "fast"})
    with pytest.raises(ValueError, match="no such setting"):
        Config().override({"train.nope": "1"})
    with pytest.raises(ValueError, match="modalities must include `text`"):
        Config().override({"data.modalities": ["video"]})


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    c = Config().override({"model.method": "amess", "amess.num_anchors": 8, "ood.detectors": ["msp"]})
    c.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == c
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"train": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        Config.load(tmp_path / "bad.yaml")


def test_mmap_threshold_is_validated_and_applied(monkeypatch):
    import sys

    from amess.config import Config
    from amess.training.memory import set_mmap_threshold

    with pytest.raises(ValueError, match="mmap_threshold_kb must be in 0..32768"):
        Config().override({"train.mmap_threshold_kb": 65536})
    assert set_mmap_threshold(None) is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own setting wins
    assert set_mmap_threshold(1024) is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if sys.platform.startswith("linux"):
        import ctypes.util

        if ctypes.util.find_library("c") == "libc.so.6":
            assert set_mmap_threshold(1024) is True


@pytest.mark.parametrize("setting, message", [
    ({"train.epochs": True}, "train.epochs: expected an integer, got True"),
    ({"train.epochs": 2.5}, "train.epochs: expected an integer, got 2.5"),
    ({"train.epochs": 0}, "train.epochs must be >= 1"),
    ({"train.seeds": 5}, "train.seeds: expected a list"),
    ({"train.lr": -1}, "train.lr must be a positive number"),
    ({"train.patience": -1}, "train.patience must be >= 1"),
    ({"train.monitor": "f1_makro"}, "train.monitor 'f1_makro' is not a dev metric"),
    ({"data.dev_split": "train:1.5"}, "0 < FRACTION < 1"),
    ({"model.method": "nope"}, "unknown method 'nope'"),
])
def test_bad_settings_are_refused_early(setting, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        Config().override(setting)


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: 1e-4\n  epochs: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml: line 4"):
        Config.load(p)


def test_method_sections_round_trip(tmp_path):
    c = Config().override({"model.method": "text", "amess.tau": 0.05})  # a non-active method's section is kept
    assert c.amess.tau == 0.05 and c.method_settings is None
    c.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == c
    assert Config().override({"model.method": "amess"}).method_settings == Config().settings_for("amess")


def test_random_configs_load_or_raise_a_value_error():
    """Property: any mapping (random keys, values, nesting) either loads as a Config that
    round-trips, or raises ValueError; nothing else escapes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True), st.text(max_size=8))
    values = st.one_of(scalars, st.lists(scalars, max_size=3))
    keys = st.sampled_from(["epochs", "lr", "seeds", "modalities", "method", "tau", "num_anchors", "patience",
                            "dev_split", "monitor", "nope", "detectors", "precision", "task"])
    sections = st.sampled_from(["data", "model", "train", "ood", "amess", "text", "bogus"])
    configs = st.dictionaries(sections, st.one_of(st.dictionaries(keys, values, max_size=4), scalars), max_size=4)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(configs)
    def check(d):
        try:
            c = Config.from_dict(d)
        except ValueError:
            return
        assert Config.from_dict(c.to_dict()) == c

    check()
