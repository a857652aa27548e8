"""Tests of routemem.config: dataclasses from dicts/YAML, key.sub=value overrides, errors naming keys."""

from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routemem.config import apply_overrides, from_dict, load_config, load_yaml, parse_override, to_dict
from routemem.errors import ConfigError, UserError
from routemem.models import LMConfig


@dataclass
class Inner:
    a: int = 1
    b: float = 0.5
    flag: bool = False
    name: str = "x"
    maybe: Optional[int] = None
    maybe_float: float | None = 1.0
    opts: dict[str, Any] = field(default_factory=dict)
    items: list[int] = field(default_factory=list)
    pair: tuple[float, ...] = (0.9, 0.95)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    model: LMConfig = field(default_factory=LMConfig)
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    name: str = "run"


# --- from_dict -----------------------------------------------------------------------------


def test_from_dict_defaults_and_nesting():
    assert from_dict(Outer, {}) == Outer()
    assert from_dict(Outer, None) == Outer()
    obj = from_dict(Outer, {
        "inner": {"a": 3, "flag": True, "opts": {"k": [1, 2]}, "items": [4, 5], "pair": [0.1, 0.2]},
        "model": {"d_model": 64, "n_head": 2, "mixer_kwargs": {"window": 8}},
        "lr": 0.01,
    })
    assert isinstance(obj.inner, Inner) and isinstance(obj.model, LMConfig)
    assert obj.inner == Inner(a=3, flag=True, opts={"k": [1, 2]}, items=[4, 5], pair=(0.1, 0.2))
    assert obj.model == LMConfig(d_model=64, n_head=2, mixer_kwargs={"window": 8})
    assert obj.lr == 0.01 and obj.steps == 10
    assert isinstance(obj.inner.pair, tuple)


def test_from_dict_lmconfig_directly():
    c = from_dict(LMConfig, {"n_layer": 3, "pos": "rope", "tie_embeddings": False, "dropout": 0})
    assert c == LMConfig(n_layer=3, pos="rope", tie_embeddings=False, dropout=0.0)
    assert isinstance(c.dropout, float)


@pytest.mark.parametrize("data, key", [
    ({"lrr": 1.0}, "lrr"),
    ({"model": {"d_modle": 64}}, "model.d_modle"),
    ({"inner": {"a": 1, "zz": 2}}, "inner.zz"),
])
def test_unknown_key_names_dotted_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert f"'{key}'" in str(info.value)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match="d_model"):
        from_dict(Outer, {"model": {"d_modle": 64}})


@pytest.mark.parametrize("data, key", [
    ({"steps": "abc"}, "steps"),
    ({"steps": 1.5}, "steps"),
    ({"steps": True}, "steps"),  # a bool is not an int
    ({"lr": "fast"}, "lr"),
    ({"lr": False}, "lr"),
    ({"flag": "yes"}, "flag"),
    ({"flag": 1}, "flag"),
    ({"name": 3}, "name"),
    ({"inner": {"a": "abc"}}, "inner.a"),
    ({"inner": {"maybe": "x"}}, "inner.maybe"),
    ({"inner": {"opts": [1, 2]}}, "inner.opts"),
    ({"inner": {"items": 3}}, "inner.items"),
    ({"inner": {"items": [1, "two"]}}, "inner.items[1]"),
    ({"inner": 5}, "inner"),
    ({"model": {"n_layer": "two"}}, "model.n_layer"),
    ({"model": {"tie_embeddings": "no"}}, "model.tie_embeddings"),
    ({"model": {"mixer_kwargs": "window=8"}}, "model.mixer_kwargs"),
])
def test_wrong_type_names_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert str(info.value).startswith(f"{key}:"), str(info.value)


def test_config_error_is_user_error():
    with pytest.raises(UserError):
        from_dict(Outer, {"steps": "abc"})


def test_invalid_value_from_post_init_names_section():
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {"model": {"d_model": 30, "n_head": 4}})
    assert "model" in str(info.value) and "d_model" in str(info.value)


def test_int_accepted_for_float_and_optional_and_dict():
    obj = from_dict(Outer, {"lr": 3, "inner": {"b": 2, "maybe": None, "maybe_float": None}})
    assert obj.lr == 3.0 and isinstance(obj.lr, float)
    assert obj.inner.b == 2.0 and isinstance(obj.inner.b, float)
    assert obj.inner.maybe is None and obj.inner.maybe_float is None
    obj = from_dict(Outer, {"inner": {"maybe": 7, "maybe_float": 2}})
    assert obj.inner.maybe == 7 and obj.inner.maybe_float == 2.0 and isinstance(obj.inner.maybe_float, float)
    obj = from_dict(Outer, {"inner": {"opts": {"x": 1, "y": {"z": None}}}})
    assert obj.inner.opts == {"x": 1, "y": {"z": None}}


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError):
        from_dict(Outer, [("lr", 1.0)])
    with pytest.raises(ConfigError):
        from_dict(Outer, "lr=1")


# --- overrides -----------------------------------------------------------------------------


def test_apply_overrides_parses_scalars():
    data = apply_overrides({}, ["a.b=3", "lr=3e-4", "flag=true", "name=foo", "x=1.5", "off=False",
                                "nothing=null", "neg=-2", "empty="])
    assert data == {"a": {"b": 3}, "lr": 0.0003, "flag": True, "name": "foo", "x": 1.5, "off": False,
                    "nothing": None, "neg": -2, "empty": ""}
    assert type(data["a"]["b"]) is int and type(data["lr"]) is float and type(data["flag"]) is bool
    assert type(data["name"]) is str


def test_parse_override():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 0.0003)
    assert parse_override("a=b=c") == (["a"], "b=c")  # only the first '=' splits
    assert parse_override(" model.n_layer =4") == (["model", "n_layer"], 4)


def test_apply_overrides_nested_and_copy():
    original = {"model": {"d_model": 64, "mixer_kwargs": {}}, "lr": 1.0}
    data = apply_overrides(original, ["model.mixer_kwargs.window=8", "model.n_layer=4", "lr=0.5"])
    assert data == {"model": {"d_model": 64, "n_layer": 4, "mixer_kwargs": {"window": 8}}, "lr": 0.5}
    assert original == {"model": {"d_model": 64, "mixer_kwargs": {}}, "lr": 1.0}  # not mutated
    # into a dict field that did not exist in the data yet
    data = apply_overrides({}, ["model.mixer_kwargs.window=8", "model.ffn_kwargs.mult=2.5"])
    obj = from_dict(Outer, data)
    assert obj.model.mixer_kwargs == {"window": 8} and obj.model.ffn_kwargs == {"mult": 2.5}


@pytest.mark.parametrize("text", ["lr", "lr 3e-4", "=3", "a..b=1", "a.=1", ""])
def test_malformed_override(text):
    with pytest.raises(ConfigError):
        apply_overrides({}, [text])


def test_override_into_scalar_is_error():
    with pytest.raises(ConfigError, match="lr"):
        apply_overrides({"lr": 1.0}, ["lr.x=2"])


def test_override_with_wrong_type_names_key():
    with pytest.raises(ConfigError, match="^model.n_layer:"):
        from_dict(Outer, apply_overrides({}, ["model.n_layer=abc"]))
    with pytest.raises(ConfigError, match="model.d_modle"):
        from_dict(Outer, apply_overrides({}, ["model.d_modle=64"]))


# --- YAML ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("nope.yaml", None),  # missing
    ("bad.yaml", "model: [1, 2\n  lr: : :\n"),  # invalid YAML
    ("list.yaml", "- 1\n- 2\n"),  # not a mapping
    ("scalar.yaml", "42\n"),
])
def test_load_yaml_errors_name_the_path(tmp_path, name, text):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=name):
        load_yaml(path)


def test_load_yaml_rejects_a_directory(tmp_path):
    with pytest.raises(ConfigError):
        load_yaml(tmp_path)


def test_load_yaml_and_config(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.01\nmodel:\n  n_layer: 3\n  mixer_kwargs: {window: 4}\ninner:\n  pair: [1, 2]\n")
    assert load_yaml(str(path)) == {"lr": 0.01, "model": {"n_layer": 3, "mixer_kwargs": {"window": 4}},
                                    "inner": {"pair": [1, 2]}}
    obj = load_config(Outer, path, ["model.n_layer=5", "steps=7"])
    assert obj.lr == 0.01 and obj.steps == 7
    assert obj.model.n_layer == 5 and obj.model.mixer_kwargs == {"window": 4}
    assert obj.inner.pair == (1.0, 2.0)
    assert load_config(Outer, None, ["lr=2"]) == Outer(lr=2.0)


def test_to_dict_round_trip():
    obj = Outer(inner=Inner(a=2, maybe=3, opts={"k": (1, 2)}, items=[1], pair=(0.1,)),
                model=LMConfig(n_layer=3, mixer_kwargs={"window": 8}), lr=0.1, name="z")
    data = to_dict(obj)
    assert data["inner"]["pair"] == [0.1] and data["inner"]["opts"] == {"k": [1, 2]}  # lists, not tuples
    assert data["model"]["mixer_kwargs"] == {"window": 8}
    back = from_dict(Outer, data)
    assert back.inner.opts == {"k": [1, 2]}
    back.inner.opts = obj.inner.opts
    assert back == obj
    assert from_dict(Outer, to_dict(Outer())) == Outer()
    assert from_dict(LMConfig, to_dict(LMConfig(pos="none"))) == LMConfig(pos="none")


def test_to_dict_round_trips_through_yaml(tmp_path):
    import yaml

    obj = Outer(inner=Inner(b=1e-5, pair=(0.5, 2.0)), lr=3e-4)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(obj)))
    assert from_dict(Outer, load_yaml(path)) == obj


# --- property: override -> typed value -----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(i=st.integers(min_value=-10**12, max_value=10**12),
       x=st.floats(allow_nan=False, allow_infinity=False),
       b=st.booleans(),
       lower=st.booleans())
def test_override_round_trips_typed_values(i, x, b, lower):
    flag = str(b).lower() if lower else str(b)
    data = apply_overrides({}, [f"steps={i}", f"lr={x!r}", f"flag={flag}", f"inner.a={i}", f"inner.b={i}"])
    obj = from_dict(Outer, data)
    assert obj.steps == i and type(obj.steps) is int
    assert obj.lr == x and type(obj.lr) is float
    assert obj.flag is b
    assert obj.inner.a == i and obj.inner.b == float(i) and type(obj.inner.b) is float
