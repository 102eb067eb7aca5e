"""The hostile-input corpus: what a pull request can put in llmops.yaml, llmops.lock and
prompt templates. Each case is a small project (files and symlinks written over BASE)
that `llmops validate` / `plan` must refuse with one clear message naming the file.

`{victim}` in a symlink target or lock text is the folder outside the project that must
survive; `{outside}` a file outside the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_CONFIG = """\
version: 1
project: hostile
datasets:
  d: {source: data/d.jsonl}
prompts:
  p:
    text: "Q: {{ question }}"
    variables: [question]
"""

BASE_FILES: dict[str, str | bytes] = {
    "llmops.yaml": BASE_CONFIG,
    "data/d.jsonl": '{"question": "a", "answer": "b"}\n',
}

# In the environment as GITHUB_TOKEN, and as a password in some cases' URLs: never printed.
SECRET = "ghp_HostileTestFakeToken0123456789abcdef"

CONFIG_CMDS = (("validate",), ("plan", "--refresh=false"))
LOCK_CMDS = (("plan", "--refresh=false"), ("apply", "--auto-approve"))


@dataclass(frozen=True)
class Case:
    name: str
    files: dict[str, str | bytes]
    needles: tuple[str, ...]  # each must appear in the output (the file named, the problem)
    links: dict[str, str] = field(default_factory=dict)  # project path -> target
    commands: tuple[tuple[str, ...], ...] = CONFIG_CMDS
    succeeds: bool = False  # the input is harmless once handled safely: exit 0 is right


def _config(extra: str) -> dict[str, str | bytes]:
    return {"llmops.yaml": BASE_CONFIG + extra}


def _prompt(body: str, *, example: bool = True) -> dict[str, str | bytes]:
    ex = '    examples:\n      - inputs: {question: "x"}\n        expect: {contains: "NEVER-THERE"}\n' if example else ""
    return _config(f"  q:\n    text: {body!r}\n    variables: [question]\n{ex}")


def _lock(entries: str, head: str = "lock_version: 1\nresources:\n") -> dict[str, str | bytes]:
    return {"llmops.lock": head + entries}


BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

_TRAINING = """\
base_models:
  m: {hf: org/model}
finetunes:
  f:
    base_model: m
    dataset: d
    prompt: p
    training: {TRAINING}
"""

_DEPLOY = """\
base_models:
  m: {hf: org/model}
finetunes:
  f: {base_model: m, dataset: d, prompt: p}
  g: {base_model: m, dataset: d, prompt: p}
deployments:
"""

CASES: list[Case] = [
    # --- llmops.lock ---
    Case("lock_traversal_delete", _lock("  finetunes.../../../../victim: {fingerprint: 'sha256:0000'}\n"),
         ("llmops.lock", "not a resource address"), commands=LOCK_CMDS),
    Case("lock_absolute_name", _lock("  datasets./tmp/x: {fingerprint: 'sha256:0000'}\n"),
         ("llmops.lock", "not a resource address"), commands=LOCK_CMDS),
    Case("lock_unknown_kind", _lock("  secrets.x: {fingerprint: 'sha256:0000'}\n"),
         ("llmops.lock", "kind must be one of"), commands=LOCK_CMDS),
    Case("lock_duplicate_key", _lock("  datasets.d: {fingerprint: a}\n  datasets.d: {fingerprint: b}\n"),
         ("llmops.lock", "duplicate key"), commands=LOCK_CMDS),
    Case("lock_not_a_mapping", {"llmops.lock": "- 1\n- 2\n"}, ("llmops.lock", "not an llmops lockfile"),
         commands=LOCK_CMDS),
    Case("lock_resources_list", _lock("  - datasets.d\n"), ("llmops.lock", "must be a mapping"), commands=LOCK_CMDS),
    Case("lock_fingerprint_int", _lock("  datasets.d: {fingerprint: 5}\n"), ("llmops.lock", "no fingerprint"),
         commands=LOCK_CMDS),
    Case("lock_int_address", _lock("  7: {fingerprint: a}\n"), ("llmops.lock", "must be a string"),
         commands=LOCK_CMDS),
    Case("lock_upstream_traversal", _lock("  datasets.d: {fingerprint: a, upstreams: {../../x: y}}\n"),
         ("llmops.lock", "upstream"), commands=LOCK_CMDS),
    Case("lock_files_list", _lock("  datasets.d: {fingerprint: a, files: [1, 2]}\n"),
         ("llmops.lock", "`files` must be a mapping"), commands=LOCK_CMDS),
    Case("lock_version_string", {"llmops.lock": "lock_version: one\nresources: {}\n"},
         ("llmops.lock", "lock_version must be an integer"), commands=LOCK_CMDS),
    Case("lock_alias_bomb", {"llmops.lock": BOMB + "lock_version: 1\n"}, ("llmops.lock", "aliases"),
         commands=LOCK_CMDS),
    Case("lock_unknown_tag", _lock("  datasets.d: !foo {fingerprint: a}\n"), ("llmops.lock", "!foo"),
         commands=LOCK_CMDS),
    Case("lock_not_utf8", {"llmops.lock": b"lock_version: 1\nresources: {\xff\xfe}\n"},
         ("llmops.lock", "not UTF-8"), commands=LOCK_CMDS),
    Case("lock_syntax_error", {"llmops.lock": "lock_version: 1\nresources: {a: [\n"},
         ("llmops.lock", "corrupt"), commands=LOCK_CMDS),
    # --- llmops.yaml: YAML itself ---
    Case("yaml_alias_bomb", {"llmops.yaml": BASE_CONFIG + BOMB}, ("llmops.yaml", "aliases expand too much")),
    Case("yaml_merge_key", _config("defaults: &x {a: 1}\nother:\n  <<: *x\n"), ("llmops.yaml", "merge keys")),
    Case("yaml_unknown_tag", _config("extra: !foo bar\n"), ("llmops.yaml", "!foo")),
    Case("yaml_python_tag", _config("extra: !!python/object/apply:os.system ['echo pwned']\n"),
         ("llmops.yaml", "tag")),
    Case("yaml_mixed_keys", _config("base_models:\n  1: {hf: a/b}\n  m: {hf: a/b}\n"),
         ("llmops.yaml", "keys must be strings")),
    Case("yaml_float_key", _config("1.5: x\n"), ("llmops.yaml", "found 1.5")),
    Case("yaml_null_key", _config("~: x\n"), ("llmops.yaml", "keys must be strings")),
    Case("yaml_deep", _config("extra: " + "[" * 300 + "]" * 300 + "\n"), ("llmops.yaml", "nests deeper")),
    Case("yaml_deeper_than_the_parser", _config("extra: " + "[" * 5000 + "]" * 5000 + "\n"), ("llmops.yaml", "nesting depth")),
    Case("yaml_top_level_list", {"llmops.yaml": "- a\n- b\n"}, ("llmops.yaml", "must be a mapping")),
    Case("yaml_not_utf8", {"llmops.yaml": b"version: 1\nproject: \xff\xfe\n"}, ("llmops.yaml", "not UTF-8")),
    Case("yaml_syntax", {"llmops.yaml": "version: 1\nproject: [\n"}, ("llmops.yaml", "YAML syntax error")),
    Case("yaml_duplicate_key", _config("datasets:\n  e: {source: data/d.jsonl}\n"), ("llmops.yaml", "duplicate key")),
    # --- llmops.yaml: accepted but wrong ---
    Case("inf_epochs", _config(_TRAINING.replace("TRAINING", "epochs: .inf")), ("llmops.yaml", "finite")),
    Case("nan_learning_rate", _config(_TRAINING.replace("TRAINING", "learning_rate: .nan")),
         ("llmops.yaml", "finite")),
    Case("huge_seq_length", _config(_TRAINING.replace("TRAINING", "max_seq_length: 1000000000000")),
         ("llmops.yaml", "maximum of 1048576")),
    Case("huge_lora_r", _config(_TRAINING.replace("training: {TRAINING}", "adapter: {r: 1000000000}")),
         ("llmops.yaml", "maximum of 4096")),
    Case("same_port", _config(_DEPLOY + "  a: {model: f, alias: a, serve: {port: 8001}}\n"
                              "  b: {model: g, alias: b, serve: {port: 8001}}\n"), ("llmops.yaml", "port 8001")),
    Case("same_model_alias", _config(_DEPLOY + "  a: {model: f}\n  b: {model: f}\n"),
         ("llmops.yaml", "alias 'production'")),
    Case("bad_other_target", _config("targets:\n  prod:\n    settings: {paralelism: 3}\n"),
         ("llmops.yaml", "--target prod", "paralelism")),
    Case("missing_metric_module", _config(
        "base_models:\n  m: {hf: org/model}\nfinetunes:\n  f: {base_model: m, dataset: d, prompt: p}\n"
        "evals:\n  e:\n    model: f\n    dataset: d\n    metrics: [{name: mine, python: 'nosuchmod_x.sub:fn'}]\n"),
        ("llmops.yaml", "nosuchmod_x.sub")),
    # --- files outside the project ---
    Case("dataset_absolute", {"llmops.yaml": BASE_CONFIG.replace("data/d.jsonl", "/etc/passwd")},
         ("llmops.yaml", "datasets.d.source", "absolute")),
    Case("dataset_dotdot", {"llmops.yaml": BASE_CONFIG.replace("data/d.jsonl", "../outside.txt")},
         ("llmops.yaml", "outside the project")),
    Case("dataset_symlink_out", {"llmops.yaml": BASE_CONFIG.replace("data/d.jsonl", "data/link.jsonl")},
         ("llmops.yaml", "outside the project"), links={"data/link.jsonl": "{outside}"}),
    Case("base_model_symlink_out", _config("base_models:\n  m: {path: models/m}\n"),
         ("llmops.yaml", "base_models.m.path", "outside the project"), links={"models/m": "{victim}"}),
    Case("template_absolute", _config("  t: {template: /etc/passwd, variables: []}\n"),
         ("llmops.yaml", "prompts.t.template", "absolute")),
    Case("template_symlink_passwd", _config("  t: {template: prompts/t.j2, variables: []}\n"),
         ("llmops.yaml", "prompts.t.template", "outside the project"), links={"prompts/t.j2": "/etc/passwd"}),
    Case("template_hidden_file", {**_config("  t: {template: .git/config, variables: []}\n"),
                                  ".git/config": "[http]\n  extraheader = AUTHORIZATION: basic x\n"},
         ("llmops.yaml", "hidden")),
    Case("template_not_utf8", {**_config("  t: {template: prompts/t.j2, variables: []}\n"),
                               "prompts/t.j2": b"hello \xff\xfe\n"}, ("prompts/t.j2", "not UTF-8")),
    # --- templates: includes ---
    Case("include_environ_symlink", {**_prompt("{% include 'prompts/env.j2' %}{{ question }}"),
                                     "prompts/t.j2": "x"},
         ("prompts/env.j2", "outside the project"), links={"prompts/env.j2": "/proc/self/environ"}),
    Case("include_outside_declared", {**_prompt("{% include 'data/d.jsonl' %}{{ question }}")},
         ("data/d.jsonl", "not under the folder of a declared template")),
    Case("include_hidden", {**_prompt("{% include 'prompts/.secret' %}{{ question }}"), "prompts/.secret": "s3cr3t"},
         ("prompts/.secret", "hidden")),
    Case("include_dotdot", _prompt("{% include '../outside.txt' %}{{ question }}"),
         ("llmops.yaml", "outside.txt")),
    Case("include_self", {**_config("  t:\n    template: prompts/self.j2\n    variables: [question]\n"
                                    "    examples:\n      - inputs: {question: x}\n        expect: {contains: y}\n"),
                          "prompts/self.j2": "{{ question }}{% include 'prompts/self.j2' %}"},
         ("prompts/self.j2", "budget")),
    # --- templates: rendering budgets (examples: run at validate time) ---
    Case("render_nested_range", _prompt(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ question }}"),
        ("llmops.yaml", "budget")),
    Case("render_nested_range_no_calls", _prompt(
        "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}{{ question }}"),
        ("llmops.yaml", "budget")),
    # No loop, so only the wall clock stops it (the loops above meet the loop budget first):
    Case("render_call_doubling", _prompt(
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}{{ question }}"),
        ("llmops.yaml", "budget", "longer than 2 s")),
    Case("render_big_repeat", _prompt("{{ 'a' * 300000000 }}{{ question }}"), ("llmops.yaml", "budget")),
    Case("render_big_power", _prompt("{{ 2 ** 100000000 }}{{ question }}"), ("llmops.yaml", "budget")),
    Case("render_filter_width", _prompt("{{ question|center(300000000) }}"), ("llmops.yaml", "budget")),
    Case("render_namespace_doubling", _prompt(
        "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}"
        "{{ ns.x|length }}{{ question }}"), ("llmops.yaml", "budget")),
    Case("render_sandbox_escape", _prompt("{{ ''.__class__.__mro__[1].__subclasses__() }}{{ question }}"),
         ("llmops.yaml", "q")),
    # --- more llmops.lock ---
    Case("lock_null_entry", _lock("  datasets.d: null\n"), ("llmops.lock", "datasets.d"), commands=LOCK_CMDS),
    Case("lock_entry_list", _lock("  datasets.d: [1, 2]\n"), ("llmops.lock", "datasets.d"), commands=LOCK_CMDS),
    Case("lock_spec_scalar", _lock("  datasets.d: {fingerprint: a, spec: 5}\n"), ("llmops.lock", "spec"),
         commands=LOCK_CMDS),
    Case("lock_outputs_string", _lock("  datasets.d: {fingerprint: a, outputs: x}\n"), ("llmops.lock", "outputs"),
         commands=LOCK_CMDS),
    Case("lock_future_version", {"llmops.lock": "lock_version: 99\nresources: {}\n"}, ("llmops.lock", "99"),
         commands=LOCK_CMDS),
    Case("lock_bool_address", _lock("  true: {fingerprint: a}\n"), ("llmops.lock", "must be a string"),
         commands=LOCK_CMDS),
    Case("lock_nul_in_address", _lock('  "datasets.d\\0x": {fingerprint: a}\n'), ("llmops.lock", "not a resource address"),
         commands=LOCK_CMDS),
    Case("lock_fullwidth_name", _lock("  finetunes.\uff0e\uff0e: {fingerprint: a}\n"),
         ("llmops.lock", "not a resource address"), commands=LOCK_CMDS),
    Case("lock_merge_key", _lock("  datasets.d: {<<: {fingerprint: a}}\n"), ("llmops.lock", "merge keys"),
         commands=LOCK_CMDS),
    Case("lock_deep", _lock("  datasets.d: {fingerprint: a, outputs: {x: " + "[" * 300 + "]" * 300 + "}}\n"),
         ("llmops.lock", "nests deeper"), commands=LOCK_CMDS),
    Case("lock_deeper_than_the_parser", _lock("  datasets.d: {fingerprint: a, outputs: {x: " + "[" * 5000 + "]" * 5000
                                              + "}}\n"), ("llmops.lock", "nesting depth"), commands=LOCK_CMDS),
    Case("lock_binary_garbage", {"llmops.lock": bytes(range(256)) * 4}, ("llmops.lock",), commands=LOCK_CMDS),
    Case("lock_upstreams_list", _lock("  datasets.d: {fingerprint: a, upstreams: [x]}\n"), ("llmops.lock", "upstreams"),
         commands=LOCK_CMDS),
    # --- more llmops.yaml ---
    Case("name_with_slash", _config("base_models:\n  'a/b': {hf: org/model}\n"), ("llmops.yaml", "a/b")),
    Case("name_dotdot", _config("base_models:\n  '..': {hf: org/model}\n"), ("llmops.yaml", "base_models")),
    Case("name_too_long", _config("base_models:\n  " + "m" * 300 + ": {hf: org/model}\n"), ("llmops.yaml", "base_models")),
    Case("name_bidi_override", _config("base_models:\n  \"m\\u202egnp\": {hf: org/model}\n"), ("llmops.yaml", "base_models")),
    Case("yaml_complex_key", _config("? [a, b]\n: c\n"), ("llmops.yaml", "keys must be scalars")),
    Case("yaml_binary_tag", {"llmops.yaml": BASE_CONFIG.replace("project: hostile", "project: !!binary aGVsbG8=")},
         ("llmops.yaml", "project")),
    Case("yaml_set_tag", _config("extra: !!set {a, b}\n"), ("llmops.yaml", "set")),
    Case("yaml_timestamp_version", {"llmops.yaml": BASE_CONFIG.replace("version: 1", "version: 2001-12-14")},
         ("llmops.yaml", "version")),
    Case("yaml_huge_file", {"llmops.yaml": BASE_CONFIG + "# " + "x" * 11_000_000 + "\n"}, ("llmops.yaml", "larger than")),
    Case("dataset_directory", {"llmops.yaml": BASE_CONFIG.replace("data/d.jsonl", "data")}, ("llmops.yaml", "datasets.d.source")),
    Case("dataset_dev_zero", {"llmops.yaml": BASE_CONFIG.replace("data/d.jsonl", "data/zero.jsonl")},
         ("llmops.yaml", "outside the project"), links={"data/zero.jsonl": "/dev/zero"}),
    Case("base_model_root", _config("base_models:\n  m: {path: /}\n"), ("llmops.yaml", "base_models.m.path")),
    Case("base_model_project_itself", _config("base_models:\n  m: {path: .}\n"), ("llmops.yaml", "base_models.m.path")),
    Case("template_directory", _config("  t: {template: prompts, variables: []}\n"), ("llmops.yaml", "prompts.t.template")),
    Case("template_dev_zero", _config("  t: {template: prompts/z.j2, variables: []}\n"),
         ("llmops.yaml", "outside the project"), links={"prompts/z.j2": "/dev/zero"}),
    Case("template_huge", {**_config("  t: {template: prompts/big.j2, variables: []}\n"),
                           "prompts/big.j2": "x" * 3_000_000}, ("prompts/big.j2", "larger than")),
    Case("public_host_without_auth", _config(_DEPLOY + "  a: {model: f, serve: {host: 0.0.0.0, port: 8001}}\n"),
         ("llmops.yaml", "0.0.0.0")),
    Case("port_out_of_range", _config(_DEPLOY + "  a: {model: f, serve: {port: 70000}}\n"), ("llmops.yaml", "70000")),
    Case("negative_epochs", _config(_TRAINING.replace("TRAINING", "epochs: -1")), ("llmops.yaml", "epochs")),
    Case("zero_batch_size", _config(_TRAINING.replace("TRAINING", "batch_size: 0")), ("llmops.yaml", "batch_size")),
    Case("threshold_unmeasured", _config(
        "base_models:\n  m: {hf: org/model}\nfinetunes:\n  f: {base_model: m, dataset: d, prompt: p}\n"
        "evals:\n  e: {model: f, dataset: d, metrics: [exact_match], thresholds: {rougeL: '>= 0.5'}}\n"),
        ("llmops.yaml", "rougeL")),
    Case("metric_parent_package_runs_code", {**_config(
        "base_models:\n  m: {hf: org/model}\nfinetunes:\n  f: {base_model: m, dataset: d, prompt: p}\n"
        "evals:\n  e:\n    model: f\n    dataset: d\n    metrics: [{name: mine, python: 'evil.nosuch:fn'}]\n"),
        "evil/__init__.py": "import os, pathlib\n"
                            "pathlib.Path(__file__).resolve().parents[2].joinpath('victim', 'keep.txt').unlink()\n"},
        ("llmops.yaml", "evil.nosuch")),
    Case("hidden_dataset_source", {"llmops.yaml": BASE_CONFIG.replace("data/d.jsonl", ".git/config"),
                                   ".git/config": "[core]\n"},
         ("llmops.yaml", "hidden folder")),
    # --- more templates ---
    Case("render_recursive_macro", _prompt(
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}{{ question }}"), ("llmops.yaml", "q")),
    Case("render_format_width", _prompt("{{ '{0:>999999999}'.format(1) }}{{ question }}"), ("llmops.yaml", "budget")),
    Case("render_percent_width", _prompt("{{ '%999999999d' % 1 }}{{ question }}"), ("llmops.yaml", "budget")),
    Case("render_list_repeat", _prompt("{{ [1] * 1000000000 }}{{ question }}"), ("llmops.yaml", "budget")),
    Case("render_range_list", _prompt("{{ range(1000000000)|list|length }}{{ question }}"), ("llmops.yaml", "budget")),
    Case("render_lipsum", _prompt("{{ lipsum(100000000) }}{{ question }}"), ("llmops.yaml", "q")),
    Case("render_list_extend_doubling", _prompt(
        "{% set l = ['a'] %}{% for i in range(40) %}{{ l.extend(l) }}{% endfor %}{{ question }}"), ("llmops.yaml", "q")),
    Case("render_globals_escape", _prompt("{{ cycler.__init__.__globals__ }}{{ question }}"), ("llmops.yaml", "q")),
    Case("include_dynamic_outside", _prompt("{% include 'data/' ~ 'd.jsonl' %}{{ question }}"),
         ("data/d.jsonl", "not under the folder of a declared template")),
    Case("extends_outside", _prompt("{% extends 'data/d.jsonl' %}"), ("data/d.jsonl", "not under the folder")),
    Case("import_environ", {**_prompt("{% import 'prompts/env.j2' as e %}{{ question }}")},
         ("prompts/env.j2", "outside the project"), links={"prompts/env.j2": "/proc/self/environ"}),
    # --- unreachable stores: fail in seconds, host named, password hidden ---
    Case("unreachable_tracking_server", {"llmops.yaml": BASE_CONFIG.replace(
        "project: hostile\n", f"project: hostile\nsettings:\n  tracking_uri: http://u:{SECRET}@127.0.0.1:9/\n")},
        ("cannot reach", "127.0.0.1"), commands=(("plan",),)),
    Case("unreachable_registry_database", {"llmops.yaml": BASE_CONFIG.replace(
        "project: hostile\n", f"project: hostile\nsettings:\n  registry_uri: postgresql://u:{SECRET}@127.0.0.1:9/r\n")},
        ("cannot reach", "127.0.0.1"), commands=(("plan",),)),
    # --- a model folder or a lock that points at the whole machine ---
    Case("model_file_links_outside", {**_config("base_models:\n  m: {path: models/m}\n"),
                                       "models/m/config.json": "{}"},
         ("models/m/weights.bin", "outside"), links={"models/m/weights.bin": "{outside}"},
         commands=(("plan", "--refresh=false"),)),
    Case("lock_hf_path_is_root", {**_config("base_models:\n  m: {hf: org/model}\n"),
                                  **_lock("  base_models.m: {fingerprint: a, inputs: {hf: org/model, commit: abc},"
                                          " outputs: {source: hf, path: /, commit: abc}}\n")},
         ("base_models.m",), commands=(("plan",),), succeeds=True),
    Case("lock_build_path_escapes", {**_config("base_models:\n  m: {path: models/m}\n"), "models/m/x": "1",
                                     **_lock("  base_models.m: {fingerprint: a, outputs: {source: path, path: ../..}}\n")},
         ("base_models.m",), commands=(("plan",),), succeeds=True),
]
