import pytest

from neuroprune import ConfigError, NeuroPruneConfig


def test_defaults_are_the_papers():
    cfg = NeuroPruneConfig()
    assert (cfg.theta, cfg.eps, cfg.merge) == (0.15, 1e-4, "output")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", -1e-4, "alpha=-0.0001 is out of range: alpha must be >= 0.0"),
        ("beta", float("nan"), "beta must be a finite number"),
        ("theta", 0.0, "theta=0.0 is out of range: theta must be > 0.0"),
        ("eps", -1.0, "eps=-1.0 is out of range"),
        ("alpha", "big", "alpha must be a finite number, got 'big'"),
        ("merge", "sum", "merge='sum' is not one of output, mlp_input, none"),
        ("attention_modules", "(", "attention_modules='(' is not a valid regular expression"),
        ("attention_layouts", [{"q": "wq"}], "must give `o` and either all of `q`, `k`, `v`"),
        ("mlp_layouts", [{"up": "w1", "down": "w2", "side": "x"}], "unknown field(s) ['side']"),
    ],
)
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ConfigError) as err:
        NeuroPruneConfig(**{field: value})
    assert message in str(err.value)


def test_round_trip_through_json(tmp_path):
    cfg = NeuroPruneConfig(alpha=0.1, beta=0.0, theta=0.3, merge="none",
                           mlp_layouts=[{"up": "w1", "down": "w2"}])
    cfg.save(tmp_path / "c.json")
    assert NeuroPruneConfig.load(tmp_path / "c.json") == cfg


def test_unknown_field_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown NeuroPruneConfig field"):
        NeuroPruneConfig.from_dict({"alpah": 1.0})
    with pytest.raises(ConfigError, match="does not exist"):
        NeuroPruneConfig.load(tmp_path / "missing.json")
