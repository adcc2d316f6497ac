import textwrap

import pytest

from megatron_selfjudge.config import Config, ConfigError, load_config, to_yaml


def test_dataclass_defaults_are_the_papers():
    cfg = load_config(embedded_default=False)
    assert cfg.rollout.n == 8 and cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.dual_clip, cfg.loss.beta_kl) == (0.2, 0.2, 3.0, 0.01)
    assert cfg.loss.agg == "token-mean" and cfg.loss.entropy_coef == 0.0
    c = cfg.reward.calibration
    assert (c.tau_h, c.tau_l, c.kappa_h, c.kappa_l, c.alpha_h, c.alpha_l, c.g_min, c.g_max) == (
        0.95, 0.40, 0.02, 0.05, 0.2, 0.2, 0.8, 1.2)
    assert cfg.reward.consistency_gate == 0.85 and cfg.reward.format_penalty == 0.5
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-6, 0.01, 1.0)
    assert cfg.trainer.prompts_per_step // cfg.trainer.mini_batch_prompts == 4
    assert (cfg.judge.samples, cfg.judge.top_p, cfg.judge.max_tokens) == (1, 0.9, 1024)


def test_embedded_default_loads_and_overrides_apply():
    cfg = load_config(overrides=["loss.beta_kl=0.05", "reward.mode=majority", "trainer.max_steps=3"])
    assert cfg.model.preset == "tiny-llava"
    assert cfg.loss.beta_kl == 0.05 and cfg.reward.mode == "majority" and cfg.trainer.max_steps == 3


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent("""
        advantage:
          estimator: grpo
          temperature: 0.5
        parallel:
          tp: 2
    """))
    cfg = load_config(f, ["advantage.temperature=2.0"])
    assert cfg.advantage.estimator == "grpo" and cfg.advantage.temperature == 2.0 and cfg.parallel.tp == 2
    assert isinstance(cfg, Config)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["judge.unparsed=neutral"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(f, embedded_default=False) == cfg


@pytest.mark.parametrize("override, needle", [
    ("loss.betakl=0.1", "betakl"),                      # unknown key
    ("nosuchsection.x=1", "nosuchsection"),             # unknown section
    ("rollout.n=eight", "rollout.n"),                   # wrong type
    ("trainer.max_steps=1.5", "trainer.max_steps"),     # wrong type
    ("rollout.n=1", "rollout.n"),                       # G < 2
    ("rollout.temperature=-0.7", "rollout.temperature"),
    ("loss.eps_low=1.0", "loss.eps_low"),
    ("loss.eps_low=1.5", "loss.eps_low"),
    ("loss.dual_clip=0.5", "loss.dual_clip"),
    ("reward.mode=vote", "reward.mode"),
    ("advantage.estimator=ppo", "advantage.estimator"),
    ("advantage.temperature=0", "advantage.temperature"),
    ("reward.consistency_gate=1.5", "reward.consistency_gate"),
    ("judge.unparsed=skip", "judge.unparsed"),
    ("loss.agg=mean", "loss.agg"),
    ("trainer.mini_batch_prompts=7", "trainer"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("noequals", "key=value"),
    ("rollout.backend=sglang", "rollout.backend"),        # not a registered engine: refused up front
    ("model.preset=qwen2.5-vl-7b", "model.preset"),
    ("data.synthetic_unlabeled=0", "data.synthetic_unlabeled"),
    ("trainer.seed=-1", "trainer.seed"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert needle in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    f.write_text("loss:\n  eps_high: [1, 2]\n")
    with pytest.raises(ConfigError, match="eps_high"):
        load_config(f)


# --- hardening (issue 15) -----------------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402

import megatron_selfjudge.config as C  # noqa: E402
from megatron_selfjudge import cli  # noqa: E402


LEAVES = dict(C.leaf_items(Config()))  # dotted key -> default value
FLOAT_KEYS = [k for k, v in LEAVES.items() if isinstance(v, float)]
INT_KEYS = [k for k, v in LEAVES.items() if isinstance(v, int) and not isinstance(v, bool)]
SEED_KEYS = ["trainer.seed", "data.synthetic_seed"]


def _one_line_error(item=None, path=None, overrides=()):
    """The ConfigError raised, asserting it is a single line."""
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides) if item is None else [item])
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


def test_the_float_and_int_key_lists_are_complete():
    assert len(FLOAT_KEYS) >= 25 and len(INT_KEYS) >= 25  # guards the walk above against going stale
    assert {"optim.adam_eps", "advantage.eps", "reward.calibration.alpha_h", "judge.top_p"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", ".inf", "-inf", "1e400"])
def test_every_float_key_refuses_non_finite_values(key, value):
    assert key in _one_line_error(f"{key}={value}")


@pytest.mark.parametrize("item", ["optim.adam_eps=0", "optim.adam_eps=-1e-8", "advantage.eps=0",
                                  "optim.weight_decay=-0.1", "loss.entropy_coef=-1", "loss.beta_kl=-0.01"])
def test_non_positive_where_positive_is_needed(item):
    assert item.split("=")[0] in _one_line_error(item)


@pytest.mark.parametrize("key", SEED_KEYS)
def test_seeds_are_bounded(key):
    assert key in _one_line_error(f"{key}={2**63}")
    assert key in _one_line_error(f"{key}={C.MAX_SEED + 1}")
    assert key in _one_line_error(f"{key}=-1")
    assert getattr(load_config(overrides=[f"{key}={C.MAX_SEED}"]), key.split(".")[0]).__dict__[
        key.split(".")[1]] == C.MAX_SEED


@pytest.mark.parametrize("key", [k for k in INT_KEYS if k not in SEED_KEYS])
def test_every_count_refuses_absurdly_large_values(key):
    assert key in _one_line_error(f"{key}={2**31}")
    assert key in _one_line_error(f"{key}={10**30}")


def test_synthetic_split_smaller_than_a_step():
    msg = _one_line_error("data.synthetic_unlabeled=15")  # tiny: 16 prompts per step
    assert "data.synthetic_unlabeled" in msg and "trainer.prompts_per_step" in msg
    assert "trainer.prompts_per_step" in _one_line_error(overrides=["trainer.prompts_per_step=4096",
                                                                    "trainer.mini_batch_prompts=8"])
    assert load_config(overrides=["data.synthetic_unlabeled=16"]).data.synthetic_unlabeled == 16
    # Files are sized when read; the synthetic sizes do not apply to them.
    cfg = load_config(overrides=["data.train=/data/train.jsonl", "data.synthetic_unlabeled=1"])
    assert cfg.data.synthetic_unlabeled == 1
    # No held-out split or no SFT split is fine: the trainer skips evaluation / the warm start.
    cfg = load_config(overrides=["data.synthetic_test=0", "data.synthetic_sft=0"])
    assert (cfg.data.synthetic_test, cfg.data.synthetic_sft) == (0, 0)


def test_synthetic_drawings_need_24_pixels():
    msg = _one_line_error(overrides=["model.image_size=16", "model.patch_size=8"])
    assert "model.image_size" in msg and "data.train" in msg
    assert load_config(overrides=["model.image_size=16", "model.patch_size=8",
                                  "data.train=/d/x.jsonl"]).model.image_size == 16


@pytest.mark.parametrize("value", ["''", "'   '", '"\\t"', '"a\\0b"'])
def test_run_dir_must_be_a_usable_path(value):
    assert "trainer.run_dir" in _one_line_error(f"trainer.run_dir={value}")


@pytest.mark.parametrize("value", ["''", "' '"])
def test_data_paths_must_not_be_blank(value):
    assert "data.train" in _one_line_error(f"data.train={value}")
    assert "data.eval" in _one_line_error(f"data.eval={value}")
    assert load_config(overrides=["data.eval=null"]).data.eval is None


@pytest.mark.parametrize("item, key", [
    ("trainer.run_dir=${nonexistent}", "trainer.run_dir"),
    ("rollout.n=${trainer.run_dir}", "rollout.n"),            # resolves to a string
    ("loss.beta_kl=${oc.nosuchresolver:1}", "loss.beta_kl"),
    ("trainer.run_dir=${trainer.run_dir}", "trainer.run_dir"),  # refers to itself
])
def test_interpolation_errors_name_the_key(item, key):
    assert key in _one_line_error(item)


def test_valid_interpolations_still_work(tmp_path):
    cfg = load_config(overrides=["trainer.mini_batch_prompts=${trainer.prompts_per_step}"])
    assert cfg.trainer.mini_batch_prompts == cfg.trainer.prompts_per_step == 16
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  run_dir: ${nonexistent}\n")
    msg = _one_line_error(path=f)
    assert "trainer.run_dir" in msg and str(f) in msg


@pytest.mark.parametrize("text, needle", [
    ("a: !!python/object/apply:os.system ['touch /tmp/selfjudge-pwned']\n", "python/object"),
    ("loss: !!python/name:os.system\n", "python/name"),
    ("loss:\n  beta_kl: [1,\n", "line 3"),
    ("loss: {beta_kl: 1\n", "line"),
    ("- 1\n- 2\n", "mapping"),
    ("5\n", "mapping"),
    ('"hello"\n', "mapping"),
    ("a: 1\n---\nb: 2\n", "single document"),
    ("a: &x [1, 2]\nb: &y [*x, *x, *x, *x, *x, *x, *x, *x, *x, *x]\nc: &z [*y, *y, *y, *y, *y, *y, *y, *y, *y]\n"
     "d: &w [*z, *z, *z, *z, *z, *z, *z, *z, *z]\ne: &v [*w, *w, *w, *w, *w, *w, *w, *w, *w]\n", "alias"),
])
def test_bad_yaml_is_one_line_naming_the_file(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    msg = _one_line_error(path=f)
    assert str(f) in msg and needle in msg
    assert not (tmp_path / "selfjudge-pwned").exists()


def test_non_utf8_directory_and_oversized_config_files(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("trainer:\n  run_dir: caf\xe9\n".encode("latin-1"))
    msg = _one_line_error(path=f)
    assert str(f) in msg and "UTF-8" in msg and "line 2" in msg
    f.write_bytes(b"\xff\xfea\x00:\x00 \x001\x00")  # UTF-16
    assert "UTF-8" in _one_line_error(path=f)
    msg = _one_line_error(path=tmp_path)
    assert str(tmp_path) in msg and "directory" in msg
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * C.MAX_CONFIG_BYTES + "\n")
    assert "bytes" in _one_line_error(path=big)


def test_empty_config_file_means_the_dataclass_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(f) == load_config(embedded_default=False)


@pytest.mark.parametrize("item", ["rollout.n=[1,", "rollout.n={a", "trainer.run_dir=!!python/object:os.system",
                                  "trainer.run_dir='a\x00b'", "trainer.run_dir=\"unterminated",
                                  "rollout.n=*alias", "loss.beta_kl=- 1\n- 2",
                                  "data.synthetic_families..y=", "data.synthetic_families.x=1",  # found by hypothesis
                                  "loss=${trainer}", "data.synthetic_families=${trainer.seed}",
                                  "rollout.n=" + "[" * 5000])
def test_unparsable_override_values_are_one_line(item):
    assert item.split("=")[0] in _one_line_error(item)


def test_group_size_and_context_bounds():
    assert "rollout.n" in _one_line_error(f"rollout.n={C.MAX_GROUP_SIZE + 1}")
    assert load_config(overrides=[f"rollout.n={C.MAX_GROUP_SIZE}"]).rollout.n == C.MAX_GROUP_SIZE
    msg = _one_line_error(overrides=[f"rollout.max_response_len={C.MAX_CONTEXT_TOKENS}"])
    assert "rollout.max_prompt_len" in msg and "rollout.max_response_len" in msg
    # The image tokens count too: a 32 px image in 8 px patches is 16 tokens.
    room = C.MAX_CONTEXT_TOKENS - 16
    assert load_config(overrides=["rollout.max_prompt_len=1", f"rollout.max_response_len={room - 1}"])
    assert "model.image_size" in _one_line_error(overrides=["rollout.max_prompt_len=1",
                                                            f"rollout.max_response_len={room}"])
    msg = _one_line_error(overrides=[f"judge.max_prompt_len={C.MAX_CONTEXT_TOKENS}"])
    assert "judge.max_prompt_len" in msg and "judge.max_tokens" in msg
    assert "judge.samples" in _one_line_error(f"judge.samples={C.MAX_JUDGE_SAMPLES + 1}")
    assert "model.image_size" in _one_line_error(f"model.image_size={C.MAX_IMAGE_SIZE + 8}")
    msg = _one_line_error(overrides=["rollout.n=1024", "trainer.prompts_per_step=2048",
                                     "data.synthetic_unlabeled=4096"])
    assert "rollout.n" in msg and "trainer.prompts_per_step" in msg


def test_cross_field_messages_name_both_keys():
    assert "reward.calibration.g_max" in _one_line_error("reward.calibration.g_max=0.5")
    assert "model.num_attention_heads" in _one_line_error("model.num_attention_heads=3")
    assert "model.patch_size" in _one_line_error("model.patch_size=5")
    assert "trainer.mini_batch_prompts" in _one_line_error("trainer.prompts_per_step=12")


# --- resume drift ---------------------------------------------------------------------------

def test_resume_safe_keys_are_leaf_keys():
    assert C.RESUME_SAFE_KEYS <= set(LEAVES)
    # Keys that change what the run learns from or optimises are never resume-safe.
    for key in ("reward.mode", "rollout.n", "loss.beta_kl", "optim.lr", "trainer.seed", "data.train",
                "model.num_layers", "trainer.prompts_per_step", "judge.kind", "advantage.estimator"):
        assert key not in C.RESUME_SAFE_KEYS


def test_config_drift_lists_meaningful_changes_only():
    saved = load_config()
    assert C.config_drift(saved, load_config()) == []
    current = load_config(overrides=["reward.mode=majority", "trainer.max_steps=500", "loss.impl=reference",
                                     "trainer.run_dir=elsewhere", "data.synthetic_families=[add,count]",
                                     "reward.calibration.g_max=1.5"])
    assert C.config_drift(saved, current) == [
        ("reward.mode", "judge", "majority"),
        ("reward.calibration.g_max", 1.2, 1.5),
        ("data.synthetic_families", ["add"], ["add", "count"]),
    ]
    # Every resume-safe key may change on its own without drift.
    for key in C.RESUME_SAFE_KEYS:
        changed = load_config()
        section, name = key.split(".")
        old = getattr(getattr(changed, section), name)
        new = {str: "other", int: 7, float: 1.5, bool: not old, list: ["reward.mode"]}[type(old)]
        setattr(getattr(changed, section), name, new)
        assert C.config_drift(saved, changed) == [], key


def test_load_saved_config_round_trip_and_damage(tmp_path):
    cfg = load_config(overrides=["reward.mode=consistency"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert C.load_saved_config(tmp_path) == cfg
    assert C.load_saved_config(tmp_path / "config.yaml") == cfg
    missing = tmp_path / "nowhere"
    missing.mkdir()
    assert "config.yaml" in str(pytest.raises(ConfigError, C.load_saved_config, missing).value)
    damaged = {
        "truncated": to_yaml(cfg)[: len(to_yaml(cfg)) // 2] + "  : [",
        "binary": "\x00\x01garbage",
        "empty": "",
        "bad value": to_yaml(cfg).replace("'n': 8", "'n': -3"),
        "unknown key": to_yaml(cfg) + "extra: 1\n",
    }
    for what, text in damaged.items():
        f = tmp_path / "config.yaml"
        f.write_text(text)
        msg = str(pytest.raises(ConfigError, C.load_saved_config, tmp_path).value)
        assert str(f) in msg and len(msg.splitlines()) == 1, (what, msg)
    f.write_bytes(b"\xff\xfe\x00garbage")
    assert "UTF-8" in str(pytest.raises(ConfigError, C.load_saved_config, tmp_path).value)


# --- `selfjudge config check` ---------------------------------------------------------------

def test_config_check_prints_the_resolved_yaml(capsys, tmp_path):
    assert cli.main(["config", "check", "loss.beta_kl=0.05"]) == 0
    out = capsys.readouterr().out
    f = tmp_path / "resolved.yaml"
    f.write_text(out)
    assert load_config(f, embedded_default=False) == load_config(overrides=["loss.beta_kl=0.05"])


@pytest.mark.parametrize("argv", [["config", "check", "optim.adam_eps=nan"],
                                  ["config", "check", "trainer.run_dir=${nope}"],
                                  ["config", "check", "--config", "/"]])
def test_config_check_errors_are_one_line_exit_2(capsys, argv):
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.splitlines()) == 1 and cap.err.startswith("selfjudge: config error: ")


def test_allow_config_change_names_real_keys():
    assert load_config(overrides=["trainer.allow_config_change=[reward.mode,rollout.n]"]).trainer.allow_config_change \
        == ["reward.mode", "rollout.n"]
    msg = _one_line_error("trainer.allow_config_change=[reward.mod]")  # a typo would allow nothing
    assert "trainer.allow_config_change" in msg and "reward.mod" in msg
    assert "trainer.allow_config_change" in _one_line_error("trainer.allow_config_change=[reward]")  # a section


def test_interpolation_error_names_the_source_that_brought_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  beta_kl: 0.05\n")
    msg = _one_line_error(path=f, overrides=["trainer.seed=3", "trainer.run_dir=${nope}", "rollout.n=4"])
    assert msg.startswith("override 'trainer.run_dir=${nope}'") and "trainer.run_dir" in msg
    f.write_text("trainer:\n  run_dir: ${nope}\n")
    assert _one_line_error(path=f, overrides=["trainer.seed=3"]).startswith(f"config file {str(f)!r}")


# The embedded default, fully resolved: the dataclass defaults plus every value tiny.yaml lists (and
# the defaults the file once restated, before it was trimmed to its overrides). Trimming or moving a
# default must not change a single resolved value; a deliberate change is made here too (the warm
# start: 1000 cosine-decayed steps on 256 labelled prompts, formerly 600 constant ones on 1024).
_TINY_RESOLVED = {
    "model": {"preset": "tiny-llava", "params_dtype": "float32", "num_layers": 2, "hidden_size": 64,
              "num_attention_heads": 4, "ffn_hidden_size": 256, "vision_num_layers": 1,
              "vision_hidden_size": 64, "image_size": 32, "patch_size": 8},
    "rollout": {"n": 8, "max_prompt_len": 64, "max_response_len": 32, "max_batch_size": 128},
    "reward": {"mode": "judge"},
    "judge": {"kind": "likelihood"},
    "optim": {"lr": 1.0e-5, "sft_lr": 1.0e-3, "weight_decay": 0.0, "sft_schedule": "cosine",
              "sft_warmup_steps": 30, "sft_min_lr": 1.0e-5},
    "data": {"train": "synthetic", "instruction": "short", "synthetic_families": ["add"],
             "synthetic_sft": 256, "synthetic_unlabeled": 2048, "synthetic_test": 256},
    "trainer": {"max_steps": 100, "prompts_per_step": 16, "mini_batch_prompts": 8,
                "micro_batch_tokens": 4096, "run_dir": "runs/tiny", "save_every": 25,
                "sft_steps": 1000, "sft_batch_size": 32},
}


def test_embedded_default_resolves_as_listed():
    expected = dataclasses.asdict(Config())
    for section, values in _TINY_RESOLVED.items():
        expected[section].update(values)
    assert dataclasses.asdict(load_config(None, [])) == expected
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(_TINY_RESOLVED) <= fields


def test_tiny_yaml_lists_only_overrides():
    import yaml

    from megatron_selfjudge.config import embedded_default_path, leaf_items

    listed = yaml.safe_load(embedded_default_path().read_text())
    defaults = dict(leaf_items(Config()))

    def flatten(mapping, prefix=""):
        for key, value in mapping.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    flat = dict(flatten(listed))
    assert flat, "tiny.yaml lists no override"
    unknown = sorted(set(flat) - set(defaults))
    assert not unknown, f"tiny.yaml lists keys that are not config leaves: {unknown}"
    restated = sorted(key for key, value in flat.items() if value == defaults[key])
    assert not restated, f"tiny.yaml restates dataclass defaults: {restated}"


def test_choices_are_the_registries_names(monkeypatch):
    """Validation accepts exactly what the implementing registries hold (no second list)."""
    from megatron_selfjudge import advantages, judges, loss
    from megatron_selfjudge.data import prompts
    from megatron_selfjudge.rewards import answers, combine, judge
    from megatron_selfjudge.rollout import base

    registries = {
        "reward.mode": list(combine.REWARD_MODES), "reward.equivalence": list(answers.EQUIVALENCE_MODES),
        "judge.kind": list(judges.JUDGE_KINDS), "judge.unparsed": list(judge.UNPARSED_POLICIES),
        "advantage.estimator": list(advantages.ESTIMATORS), "loss.agg": list(loss.AGG_MODES),
        "loss.impl": list(loss.IMPL_CHOICES), "rollout.backend": base.available_engines(),
        "data.instruction": list(prompts.INSTRUCTIONS),
    }
    for key, names in registries.items():
        for name in names:
            load_config(overrides=[f"{key}={name}"])
        with pytest.raises(ConfigError) as err:
            load_config(overrides=[f"{key}=no_such_choice"])
        assert str(err.value) == f"{key}='no_such_choice' is not one of {', '.join(names)}"
    # A name registered at run time is a valid choice at once.
    monkeypatch.setattr(advantages, "ESTIMATORS", {**advantages.ESTIMATORS, "rank": advantages.grpo})
    assert load_config(overrides=["advantage.estimator=rank"]).advantage.estimator == "rank"
    monkeypatch.setattr(combine, "REWARD_MODES", {**combine.REWARD_MODES, "half": combine.REWARD_MODES["majority"]})
    assert load_config(overrides=["reward.mode=half"]).reward.mode == "half"
    monkeypatch.setattr(base, "_REGISTERED_ENGINES", {**base._REGISTERED_ENGINES, "echo": object})
    cfg = load_config(overrides=["rollout.backend=echo", "judge.backend=echo"])
    assert (cfg.rollout.backend, cfg.judge.backend) == ("echo", "echo")


def test_uses_generative_judge_follows_the_reward_registry():
    from megatron_selfjudge.config import uses_generative_judge

    for mode in ("majority", "consistency", "judge", "judge_raw", "ground_truth", "random"):
        for kind in ("generative", "likelihood"):
            cfg = load_config(overrides=[f"reward.mode={mode}", f"judge.kind={kind}"])
            assert uses_generative_judge(cfg) == (mode in ("judge", "judge_raw") and kind == "generative")


@pytest.mark.parametrize("item", ["[=", "[=1"])
def test_keys_omegaconf_cannot_parse_are_one_error(item):
    """Found by the property test: OmegaConf's key parser raised IndexError on "["."""
    with pytest.raises(ConfigError, match="malformed key"):
        load_config(None, [item])
