"""Property tests of config loading: any key=value override ends in a valid Config or one error line.

`selfjudge config check` is the CLI path that loads and validates without building a model;
every outcome must be exit 0 with YAML that loads back to the same Config, or exit 2 with a
single stderr line `selfjudge: config error: ...` that names the override's key.
"""
import dataclasses
import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_selfjudge import cli
from megatron_selfjudge.config import Config, ConfigError, load_config, to_yaml, validate

pytestmark = pytest.mark.filterwarnings("ignore")


def _keys(obj, prefix=""):
    """Every dotted key of the dataclasses: sections and leaves."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")


VALID_KEYS = sorted(_keys(Config()))
_IDENT = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
INVALID_KEYS = st.one_of(
    st.lists(_IDENT, min_size=1, max_size=4).map(".".join),       # unknown names
    st.sampled_from(VALID_KEYS).flatmap(lambda k: st.sampled_from(
        [k + "x", k + ".", k + "..y", "x" + k, k + "[0]", k + ".sub", k.upper(), k + " ", " " + k])),
    st.text(string.ascii_letters + string.digits + "._[]$ {}:", min_size=1, max_size=12)
    .filter(lambda k: not k.startswith("-") and "=" not in k),
)
KEYS = st.one_of(st.sampled_from(VALID_KEYS), st.sampled_from(VALID_KEYS), INVALID_KEYS)  # 2/3 valid

YAML_SPECIAL = ["", " ", "~", "null", "Null", "NULL", "true", "false", "yes", "no", "on", "off", "y", "n",
                "???", "${x}", "${trainer.seed}", "${trainer.run_dir}", "${oc.env:HOME}", "${oc.env:NOPE_X}",
                "${", "}", "${foo:bar}", "!!python/object:os.system", "!!python/name:os.system",
                "!!binary aGk=", "!!float 1", "!!str 5", "&a 1", "*a", "|", ">", "- x", "#", ": ", "'", '"',
                "%YAML 1.2", "[", "]", "{", "{}", "[]", "[1, 2]", "{a: 1}", "[add]", "[nope]", "0x10",
                "0o17", "1_000", "1e-8", "+1", ".5", "-.inf", ".NaN", "1e400", "-1e400", "synthetic",
                "runs/x", "/", "\x00", "a\x00b", "\t", "a\nb", "a\rb", "\u2028", "é", "\ufeff"]
VALUES = st.one_of(
    st.sampled_from(YAML_SPECIAL),
    st.sampled_from(["nan", "inf", "-inf", ".inf", "NaN"]),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]).map(str),
    st.integers(min_value=-3, max_value=5000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-2.0, max_value=2.0).map(repr),
    st.text(max_size=12),
    st.lists(st.sampled_from(["add", "count", "x", "1", "[]", "null"]), max_size=3).map(
        lambda xs: "[" + ", ".join(xs) + "]"),
)


def _check_outcome(capsys, argv, key):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors only; must not happen for these argv shapes
        pytest.fail(f"argparse exited {exc.code} for {argv!r}")
    cap = capsys.readouterr()
    if code == 0:
        assert cap.err == "" and cap.out
        return cap.out
    assert code == 2, (argv, code, cap)
    lines = cap.err.splitlines()
    assert len(lines) == 1 and cap.err.endswith("\n"), (argv, cap.err)
    assert lines[0].startswith("selfjudge: config error: "), lines
    assert key in lines[0], (key, lines[0])
    assert cap.out == ""
    return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=KEYS, value=VALUES)
def test_any_override_is_a_config_or_one_error_line(capsys, tmp_path_factory, key, value):
    out = _check_outcome(capsys, ["config", "check", f"{key}={value}"], key)
    if out is not None:  # the printed YAML is a valid config that prints back identically
        f = tmp_path_factory.mktemp("resolved") / "config.yaml"
        f.write_text(out, encoding="utf-8")
        cfg = load_config(f, embedded_default=False)
        assert isinstance(cfg, Config) and validate(cfg) is cfg and to_yaml(cfg) == out


def test_the_library_raises_what_the_cli_prints(capsys):
    """A fixed sample of the property above, through load_config directly."""
    for item in ["optim.adam_eps=nan", "rollout.n=${nope}", "loss.betakl=1", "rollout.n=[1,"]:
        assert cli.main(["config", "check", item]) == 2
        with pytest.raises(ConfigError) as err:
            load_config(None, [item])
        assert capsys.readouterr().err == f"selfjudge: config error: {err.value}\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(VALID_KEYS), value=VALUES)
def test_the_same_values_in_a_yaml_file(capsys, tmp_path_factory, key, value):
    """A YAML file holding `a: {b: value}` behaves like the override: valid, or one line naming the file."""
    parts = key.split(".")
    text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parts[:-1])) + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}\n"
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_text(text, encoding="utf-8")
    code = cli.main(["config", "check", "--config", str(f)])
    cap = capsys.readouterr()
    if code == 0:
        assert cap.err == "" and cap.out
        return
    assert code == 2
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfjudge: config error: "), cap.err
    # The message names the file (a parse error) or the key (a value error).
    assert str(f) in lines[0] or parts[-1] in lines[0], lines[0]


_SECTION = st.sampled_from([k for k in VALID_KEYS if "." not in k] + ["extra"])
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_DOCUMENT = st.dictionaries(_SECTION, st.one_of(
    _SCALAR, st.lists(_SCALAR, max_size=3),
    st.dictionaries(st.sampled_from(sorted({k.split(".")[1] for k in VALID_KEYS if "." in k}) + ["zz"]),
                    st.one_of(_SCALAR, st.lists(_SCALAR, max_size=2)), max_size=4)), max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(
    _DOCUMENT.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode("utf-8")),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8")),
))
def test_any_file_content_is_a_config_or_one_error_line(capsys, tmp_path_factory, content):
    """Whole documents (sections of random keys and values), random text and random bytes."""
    f = tmp_path_factory.mktemp("doc") / "c.yaml"
    f.write_bytes(content)
    code = cli.main(["config", "check", "--config", str(f)])
    cap = capsys.readouterr()
    if code == 0:
        assert cap.err == "" and cap.out
        return
    assert code == 2 and cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfjudge: config error: "), cap.err
    # Parse errors name the file; value errors name the dotted key (`section.key=value ...`).
    assert str(f) in lines[0] or re.match(r"selfjudge: config error: [a-z_]+\.[a-z_.]+", lines[0]), lines[0]
