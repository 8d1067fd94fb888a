"""XVocabConfig: reading xvocab_* keys the three ways slime can deliver them, and one clear error."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import warnings
from pathlib import Path

import pytest
import yaml
from slime_standin import make_args

from slime_xvocab.config import XVocabConfig, fields_reference, reference_markdown
from slime_xvocab.errors import ConfigError
from slime_xvocab.train import add_xvocab_arguments

ROOT = Path(__file__).resolve().parent.parent
BASE = {"hf_checkpoint": "/models/student", "xvocab_teacher_tokenizer": "/models/teacher",
        "xvocab_teacher_urls": "http://127.0.0.1:30000"}


def build(environ=None, **overrides) -> XVocabConfig:
    return XVocabConfig.from_args(make_args(**{**BASE, **overrides}), environ=environ or {})


def test_defaults_and_slime_fallbacks():
    config = build()
    assert config.teacher_urls == ("http://127.0.0.1:30000",)
    assert config.student_tokenizer == "/models/student"  # --hf-checkpoint
    assert (config.credit_mode, config.chunk_split, config.fallback) == ("student_token", "uniform", "student")
    # slime's own OPD passes the teacher as --rm-url: that alone is enough.
    args = make_args(hf_checkpoint="/s", xvocab_teacher_tokenizer="/t", rm_url="http://10.0.0.7:13141/generate")
    assert XVocabConfig.from_args(args, environ={}).teacher_urls == ("http://10.0.0.7:13141/generate",)


def test_yaml_through_slimes_setattr_loop(tmp_path):
    (tmp_path / "x.yaml").write_text(
        "xvocab_teacher_tokenizer: /models/teacher\n"
        "xvocab_teacher_urls: [http://a:30000, http://b:30000/generate]\n"
        "xvocab_template_kwargs: {enable_thinking: false}\n"
        "xvocab_timeout_s: 1e-3\n"  # YAML reads this as a string; accepted as a number
        "xvocab_max_teacher_tokens: 4096\n"
        "xvocab_credit_mode: exact\n"
    )
    args = make_args(hf_checkpoint="/models/student")
    for key, value in yaml.safe_load((tmp_path / "x.yaml").read_text()).items():  # what slime does
        setattr(args, key, value)
    config = XVocabConfig.from_args(args, environ={})
    assert config.teacher_urls == ("http://a:30000", "http://b:30000/generate")
    assert config.template_kwargs == {"enable_thinking": False}
    assert config.timeout_s == 1e-3 and config.max_teacher_tokens == 4096 and config.credit_mode == "exact"


def test_environment_overrides_args():
    env = {
        "XVOCAB_TEACHER_URLS": "http://x:1, http://y:2",
        "XVOCAB_API_KEY": "sk-secret",
        "XVOCAB_MAX_RETRIES": "7",
        "XVOCAB_TEMPLATE_KWARGS": '{"enable_thinking": false}',
        "XVOCAB_TRUST_REMOTE_CODE": "false",
        "XVOCAB_MAX_TEACHER_TOKENS": "none",
    }
    config = build(environ=env, xvocab_max_retries=1, xvocab_max_teacher_tokens=99)
    assert config.teacher_urls == ("http://x:1", "http://y:2")
    assert config.max_retries == 7 and config.max_teacher_tokens is None and config.trust_remote_code is False
    assert config.to_dict()["api_key"] == "***" and "sk-secret" not in repr(config)
    assert config.to_dict(redact=False)["api_key"] == "sk-secret"


def test_every_problem_in_one_error():
    env = {"XVOCAB_TIMEOUT_S": "soon", "XVOCAB_TEACHER_URL": "http://x"}
    args = make_args(
        hf_checkpoint="/s",
        xvocab_teacher_tokenzier="/t",
        xvocab_credit_mode="chunks",
        xvocab_max_retries=-1,
        xvocab_template_kwargs="enable_thinking=false",
        xvocab_fallback="student_lp",
        xvocab_inner_rm_type="math",
        xvocab_inner_rm_path="my.rm",
        use_opd=False,
    )
    with pytest.raises(ConfigError) as info:
        XVocabConfig.from_args(args, environ=env)
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    text = "\n".join(lines)
    assert len(lines) == 11, text
    for expected in [
        "unknown key 'xvocab_teacher_tokenzier' (did you mean 'xvocab_teacher_tokenizer'?)",
        "unknown environment variable 'XVOCAB_TEACHER_URL' (did you mean 'XVOCAB_TEACHER_URLS'?)",
        "XVOCAB_TIMEOUT_S (environment) = 'soon': must be a number",
        "xvocab_credit_mode = 'chunks': must be one of student_token, chunk, exact (did you mean 'chunk'?)",
        "xvocab_max_retries = -1: must be >= 0",
        "xvocab_template_kwargs = 'enable_thinking=false': must be a mapping",
        "xvocab_fallback = 'student_lp': must be one of student, error",
        "xvocab_teacher_tokenizer is not set",
        "xvocab_teacher_urls is not set",
        "xvocab_inner_rm_type and xvocab_inner_rm_path are both set",
        "--use-opd is not set",
    ]:
        assert expected in text, expected
    assert isinstance(info.value, ValueError)  # ConfigError is also a ValueError
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args  # crosses Ray actors


def test_opd_type_and_temperature():
    with pytest.raises(ConfigError, match="--opd-type is 'megatron'"):
        build(opd_type="megatron")
    assert build().teacher_temperature == 1.0  # follows --rollout-temperature (1 in make_args)
    with pytest.warns(UserWarning, match="need an SGLang teacher with input_logprob_temperature"):
        assert build(rollout_temperature=0.7).teacher_temperature == 0.7
    with pytest.warns(UserWarning, match="xvocab_teacher_temperature is 1.0 but --rollout-temperature is 0.7"):
        build(rollout_temperature=0.7, xvocab_teacher_temperature=1.0)
    assert build(environ={"XVOCAB_TEACHER_TEMPERATURE": "none"}).teacher_temperature == 1.0
    with pytest.raises(ConfigError, match="xvocab_teacher_temperature = 0"):
        build(xvocab_teacher_temperature=0)


def warned(**overrides) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(**overrides)
    return [str(w.message) for w in caught]


def test_start_up_warnings_for_slime_settings_that_bias_the_opd_delta():
    assert warned() == []  # slime's defaults as make_args has them, OPD launch flags included
    assert any("--rollout-top-p is 0.9" in w for w in warned(rollout_top_p=0.9))
    assert not any("rollout-top-p" in w for w in warned(rollout_top_p=1.0))
    keep = warned(use_rollout_logprobs=False)
    assert any("without --use-rollout-logprobs" in w and "--use-rollout-logprobs" in w for w in keep)
    assert warned(use_rollout_logprobs=True) == []
    assert warned(use_rollout_logprobs=False, xvocab_unscored="mask") == []
    assert any("--normalize-advantages" in w for w in warned(use_rollout_logprobs=True, normalize_advantages=True))


def test_remote_rm_on_the_teacher_url_is_rejected():
    args = {k: v for k, v in BASE.items() if k != "xvocab_teacher_urls"}
    with pytest.raises(ConfigError, match="remote_rm, which posts rewards to --rm-url") as info:
        XVocabConfig.from_args(
            make_args(**args, rm_url="http://10.0.0.7:13141/generate", xvocab_inner_rm_type="remote_rm"), environ={}
        )
    assert "xvocab_teacher_urls" in str(info.value)
    config = XVocabConfig.from_args(  # a separate teacher URL: fine
        make_args(**BASE, rm_url="http://10.0.0.8:8000/reward", xvocab_inner_rm_type="remote_rm"), environ={}
    )
    assert config.inner_rm_type == "remote_rm"


def test_config_pickles_and_is_frozen():
    config = build()
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(AttributeError):
        config.timeout_s = 1.0  # type: ignore[misc]


def test_xvocab_flags_parse_to_the_same_config():
    parser = add_xvocab_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(
        ["--xvocab-teacher-tokenizer", "/models/teacher", "--xvocab-teacher-urls", "http://a:1,http://b:2",
         "--xvocab-template-kwargs", '{"enable_thinking": false}', "--xvocab-max-retries", "5",
         "--xvocab-trust-remote-code", "false", "--xvocab-credit-mode", "exact"]
    )
    args = make_args(hf_checkpoint="/models/student", **vars(ns))
    config = XVocabConfig.from_args(args, environ={})
    assert config.teacher_urls == ("http://a:1", "http://b:2") and config.max_retries == 5
    assert config.template_kwargs == {"enable_thinking": False} and config.trust_remote_code is False
    assert config.credit_mode == "exact" and config.timeout_s == 120.0  # unset flags keep defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--xvocab-credit-mode", "chunks"])


def test_flag_and_key_names_cover_every_field():
    entries = fields_reference()
    assert [e["name"] for e in entries] == list(XVocabConfig.__dataclass_fields__)
    parser = add_xvocab_arguments(argparse.ArgumentParser())
    flags = {a for action in parser._actions for a in action.option_strings}
    assert {e["flag"] for e in entries} <= flags


def test_configuration_doc_is_generated_from_the_code():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(
        r"<!-- BEGIN xvocab_config_reference -->\n(.*?)<!-- END xvocab_config_reference -->", doc, re.S
    )
    assert block, "docs/configuration.md lost its generated block"
    assert block.group(1) == reference_markdown(), "regenerate it: python -m slime_xvocab.config"
    for entry in fields_reference():
        assert f"`{entry['key']}`" in doc


def test_example_yaml_files_are_valid_and_comment_every_key():
    files = sorted(ROOT.glob("examples/*/xvocab.yaml"))
    assert len(files) >= 3
    for path in files:
        data = yaml.safe_load(path.read_text())
        args = make_args(hf_checkpoint="/models/student")
        for key, value in data.items():
            setattr(args, key, value)
        keys = {t["api_key_env"]: "sk-test" for t in data.get("xvocab_teachers") or [] if "api_key_env" in t}
        XVocabConfig.from_args(args, environ=keys)  # raises if any key is wrong
        lines = path.read_text().splitlines()
        key_line = re.compile(r"(# )?xvocab_\w+:")
        for i, line in enumerate(lines):
            if key_line.match(line):  # a group of keys must start right after an explanatory comment
                j = i
                while j > 0 and key_line.match(lines[j - 1]):
                    j -= 1
                assert j > 0 and lines[j - 1].startswith("#"), f"{path}: {line!r} has no comment above it"
        for entry in fields_reference():  # every setting appears, set or commented out
            assert re.search(rf"^(# )?{entry['key']}:", path.read_text(), re.M), f"{path}: {entry['key']}"


# ---------------------------------------------------------------------------------------------- transport


def test_bad_teacher_urls_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"xvocab_teacher_urls = .*port 99999 is out of range") as ei:
        build(xvocab_teacher_urls="http://127.0.0.1:99999")
    assert "xvocab_teacher_urls" in str(ei.value)
    with pytest.raises(ConfigError, match=r"user:password@ and xvocab_api_key is set too") as ei:
        build(xvocab_teacher_urls="http://bob:hunter22@10.0.0.7:30000", environ={"XVOCAB_API_KEY": "sk-abcdef"})
    assert "hunter22" not in str(ei.value) and "sk-abcdef" not in str(ei.value)
    with pytest.raises(ConfigError, match="xvocab_ca_bundle='/nonexistent.pem' cannot be used"):
        build(xvocab_ca_bundle="/nonexistent.pem")


def test_secrets_are_never_echoed():
    with pytest.raises(ConfigError, match=r"xvocab_api_key = <redacted int>: must be a non-empty string") as ei:
        build(xvocab_api_key=123456789)
    assert "123456789" not in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        build(xvocab_teacher_urls=["http://bob:hunter22@h:1", "ftp://bob:hunter22@h:2"])
    assert "hunter22" not in str(ei.value) and "***@" in str(ei.value)
    config = build(xvocab_teacher_urls="http://bob:hunter22@10.0.0.7:30000")
    assert "hunter22" not in repr(config) and config.to_dict()["teacher_urls"] == ["http://***@10.0.0.7:30000"]
    assert config.to_dict(redact=False)["teacher_urls"] == ["http://bob:hunter22@10.0.0.7:30000"]


def test_one_api_key_variable_and_the_old_name_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="SLIME_XVOCAB_TEACHER_API_KEY is deprecated: set XVOCAB_API_KEY"):
        config = build(environ={"SLIME_XVOCAB_TEACHER_API_KEY": "sk-old-name"})
    assert config.api_key == "sk-old-name"
    assert build(environ={"SLIME_XVOCAB_TEACHER_API_KEY": "sk-old", "XVOCAB_API_KEY": "sk-new"}).api_key == "sk-new"


def test_transport_warnings(recwarn):
    build(xvocab_teacher_urls="http://10.0.0.7:30000", environ={"XVOCAB_API_KEY": "sk-abcdef"})
    messages = [str(w.message) for w in recwarn]
    assert any("clear text over plain http to http://10.0.0.7:30000" in m for m in messages)
    recwarn.clear()
    build(environ={"XVOCAB_API_KEY": "sk-abcdef"})  # loopback: no warning
    build(xvocab_teacher_urls="https://10.0.0.7:30000", environ={"XVOCAB_API_KEY": "sk-abcdef"})
    assert not [w for w in recwarn if "clear text" in str(w.message)]
    build(xvocab_api_key="sk-in-yaml")
    assert any("slime prints with its arguments" in str(w.message) for w in recwarn)
    assert not any("sk-in-yaml" in str(w.message) for w in recwarn)


def test_retry_budget_and_the_max_retries_cap():
    config = build()
    assert config.retry_budget_s == 60.0 and config.max_retries is None
    config = build(environ={"XVOCAB_RETRY_BUDGET_S": "5", "XVOCAB_MAX_RETRIES": "2"})
    assert config.retry_budget_s == 5.0 and config.max_retries == 2
    with pytest.raises(ConfigError, match="xvocab_retry_budget_s = -1: must be >= 0"):
        build(xvocab_retry_budget_s=-1)


def test_dense_distillation_does_not_need_slimes_opd_flag():
    """With xvocab_dense the signal is the dense loss; slime's --use-opd (sampled-token OPD) is optional."""
    args = make_args(hf_checkpoint="/s", xvocab_teacher_tokenizer="/t", xvocab_teacher_urls="http://t:1",
                     use_opd=False, xvocab_dense=True, xvocab_dense_divergence="jsd")
    config = XVocabConfig.from_args(args, environ={}, warn=False)
    assert config.dense and config.dense_divergence == "jsd" and config.dense_top_k == 20
    with pytest.raises(ConfigError, match="use-opd"):
        XVocabConfig.from_args(make_args(hf_checkpoint="/s", xvocab_teacher_tokenizer="/t",
                                         xvocab_teacher_urls="http://t:1", use_opd=False), environ={})


# ---------------------------------------------------------------------------------------------- several teachers

TEACHERS = [
    {"name": "math", "tokenizer": "/models/math", "urls": "http://127.0.0.1:30001", "max_teacher_tokens": 4096},
    {"name": "chat", "tokenizer": "/models/chat", "urls": ["http://127.0.0.1:30002", "http://127.0.0.1:30003"],
     "api_key_env": "CHAT_KEY", "top_k": 8, "max_failed_fraction": 0.5},
]
MULTI = {"xvocab_teacher_tokenizer": None, "xvocab_teacher_urls": None, "xvocab_teachers": TEACHERS,
         "xvocab_teacher_route_key": "source"}


def multi(environ=None, **overrides):
    return build(environ=environ if environ is not None else {"CHAT_KEY": "sk-chat-123"}, **{**MULTI, **overrides})


def test_the_single_teacher_keys_are_one_teacher_named_default():
    config = build()
    (teacher,) = config.teachers
    assert teacher.name == "default" and teacher.tokenizer == "/models/teacher"
    assert teacher.urls == config.teacher_urls and config.default_teacher == (("default", 1.0),)
    assert teacher.max_failed_fraction == config.max_failed_fraction and teacher.top_k == config.top_k


def test_a_teacher_list_with_overrides_routes_and_keys_from_the_environment():
    config = multi(xvocab_teacher_routes={"gsm8k": "math", 7: {"math": 1, "chat": 3}}, xvocab_timeout_s=9.0)
    math, chat = config.teachers
    assert math.max_teacher_tokens == 4096 and chat.max_teacher_tokens is None
    assert chat.top_k == 8 and math.top_k == config.top_k and chat.max_failed_fraction == 0.5
    assert math.timeout_s == chat.timeout_s == 9.0  # top-level settings are every teacher's default
    assert chat.api_key == "sk-chat-123" and math.api_key is None
    assert config.teacher_routes == {"gsm8k": (("math", 1.0),), "7": (("math", 0.25), ("chat", 0.75))}
    assert config.default_teacher == (("math", 1.0),)  # the first teacher
    assert "sk-chat-123" not in repr(config) and config.to_dict()["teachers"][1]["api_key"] == "***"
    assert multi(xvocab_default_teacher={"chat": 1, "math": 1}).default_teacher == (("chat", 0.5), ("math", 0.5))


def test_teachers_from_environment_json():
    env = {"XVOCAB_TEACHERS": json.dumps(TEACHERS[:1]), "XVOCAB_TEACHER_ROUTES": '{"a": "math"}',
           "XVOCAB_DEFAULT_TEACHER": "math"}
    config = build(environ=env, xvocab_teacher_tokenizer=None, xvocab_teacher_urls=None,
                   xvocab_teacher_route_key="source")
    assert [t.name for t in config.teachers] == ["math"] and config.teacher_routes == {"a": (("math", 1.0),)}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"xvocab_teachers": [TEACHERS[0], {**TEACHERS[1], "name": "math"}]},
         r"xvocab_teachers\[1\] \('math'\): duplicate teacher name 'math'"),
        ({"xvocab_teachers": [{**TEACHERS[0], "max_teacher_token": 10}]},
         r"xvocab_teachers\[0\] \('math'\): unknown key 'max_teacher_token' \(did you mean 'max_teacher_tokens'\?\)"),
        ({"xvocab_teachers": [{"name": "math", "urls": "http://127.0.0.1:1"}]},
         r"xvocab_teachers\[0\] \('math'\): tokenizer is missing"),
        ({"xvocab_teachers": [{"name": "math", "tokenizer": "/t"}]},
         r"xvocab_teachers\[0\] \('math'\): urls is missing"),
        ({"xvocab_teachers": [{**TEACHERS[0], "urls": "ftp://x:1"}]}, r"xvocab_teachers\[0\] \('math'\): urls = "),
        ({"xvocab_teachers": [{**TEACHERS[0], "top_k": 0}]},
         r"xvocab_teachers\[0\] \('math'\): top_k = 0: must be >= 1"),
        ({"xvocab_teachers": [{**TEACHERS[0], "name": "my teacher"}]}, r"name must be 1-64 letters"),
        ({"xvocab_teachers": [{**TEACHERS[0], "name": None}]}, r"xvocab_teachers\[0\]: name must be"),
        ({"xvocab_teachers": "math"}, r"xvocab_teachers = 'math': must be a list of teacher entries"),
        ({"xvocab_teacher_routes": {"gsm8k": "maths"}},
         r"xvocab_teacher_routes\['gsm8k'\]: 'maths' is not a configured teacher \(teachers: math, chat\)"),
        ({"xvocab_teacher_routes": {"mix": {"math": -1}}}, r"weight of teacher 'math' must be a finite number > 0"),
        ({"xvocab_teacher_routes": {"a": "math"}, "xvocab_teacher_route_key": None},
         r"xvocab_teacher_routes is set but xvocab_teacher_route_key is not"),
        ({"xvocab_default_teacher": "poetry"}, r"xvocab_default_teacher: 'poetry' is not a configured teacher"),
        ({"xvocab_teacher_tokenizer": "/models/teacher"}, r"xvocab_teachers and xvocab_teacher_tokenizer are both set"),
        ({"xvocab_teachers": [{**TEACHERS[0], "api_key_env": "NOPE"}]},
         r"api_key_env names 'NOPE', which is not set in this process's environment"),
        ({"xvocab_teachers": [{**TEACHERS[0], "api_key_env": "CHAT_KEY", "api_key": "x"}]},
         r"api_key and api_key_env are both set"),
        ({"xvocab_teachers": [{**TEACHERS[0], "max_failed_fraction": 2}]}, r"max_failed_fraction must be <= 1.0"),
    ],
)
def test_teacher_list_errors_name_the_teacher_and_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        multi(**overrides)


def test_a_teacher_api_key_is_never_echoed_and_the_top_level_key_is_not_inherited(recwarn):
    with pytest.raises(ConfigError) as ei:
        multi(xvocab_teachers=[{**TEACHERS[0], "api_key": 12345678}])
    assert "12345678" not in str(ei.value)
    config = multi(environ={"CHAT_KEY": "sk-chat-123", "XVOCAB_API_KEY": "sk-top"})
    assert [t.api_key for t in config.teachers] == [None, "sk-chat-123"]
    assert any("listed teachers never get the top-level key" in str(w.message) for w in recwarn)


def test_teacher_flags_of_the_train_entry_point():
    parser = add_xvocab_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(
        ["--xvocab-teachers", json.dumps(TEACHERS[:1]), "--xvocab-teacher-route-key", "source",
         "--xvocab-teacher-routes", '{"gsm8k": "math"}', "--xvocab-default-teacher", "math"]
    )
    config = XVocabConfig.from_args(make_args(hf_checkpoint="/models/student", **vars(ns)), environ={})
    assert config.teachers[0].name == "math" and config.default_teacher == (("math", 1.0),)
    ns = parser.parse_args(["--xvocab-default-teacher", '{"math": 1}'])
    assert ns.xvocab_default_teacher == {"math": 1}
    with pytest.raises(SystemExit):
        parser.parse_args(["--xvocab-teachers", '{"name": "math"}'])  # a list, not one object


def test_dense_distillation_takes_one_teacher():
    with pytest.raises(ConfigError, match="xvocab_dense takes one teacher; 2 are configured"):
        multi(xvocab_dense=True)
    assert build(xvocab_dense=True).dense  # the single-teacher keys: one teacher, fine
