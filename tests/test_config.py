"""Configuration is validated once, at the edge, with errors that name the key and the fix."""

from __future__ import annotations

import pytest

from seedtune.common.config import Config, load_config, parse_override
from seedtune.common.errors import ConfigError


@pytest.mark.parametrize("override, fragment", [
    ("privacy.epsilom=2", "unknown config key 'privacy.epsilom'; did you mean privacy.epsilon?"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("privacy.epsilon=0", "privacy.epsilon=0.0 is invalid"),
    ("privacy.epsilon=-1", "privacy.epsilon=-1.0 is invalid"),
    ("privacy.epsilon=inf", "privacy.epsilon=inf is invalid"),
    ("privacy.delta=0", "privacy.delta=0.0 is invalid: it must be in (0, 1)"),
    ("privacy.delta=1", "privacy.delta=1.0 is invalid"),
    ("privacy.sample_rate=0", "privacy.sample_rate=0.0 is invalid: it must be in (0, 1]"),
    ("privacy.sample_rate=1.5", "privacy.sample_rate=1.5 is invalid"),
    ("privacy.clip_bound=0", "privacy.clip_bound=0.0 is invalid"),
    ("schedule.beta=-0.1", "schedule.beta=-0.1 is invalid"),
    ("schedule.beta=0", "schedule.beta=0.0 is invalid"),
    ("zo.probes=two", "zo.probes='two' is invalid: it must be an integer"),
    ("privacy.enabled=yes", "privacy.enabled='yes' is invalid: it must be true or false"),
    ("model.task=regression", "model.task='regression' is invalid"),
    ("prune.always=[lm.model.norm.weight]",  # the shell ate the quotes
     "prune.always='[lm.model.norm.weight]' is invalid: quote each string of the list, e.g. --set 'prune.always=[\"classifier.*\"]'"),
    ("schedule.kind=constant", "schedule.prox"),  # passes: prox defaults to 0
])
def test_bad_values_name_the_key_and_the_fix(override, fragment):
    if override == "schedule.kind=constant":
        assert load_config("default", overrides=[override]).schedule.kind == "constant"
        with pytest.raises(ConfigError, match="proximal"):
            load_config("default", overrides=[override, "schedule.prox=0.1"])
        return
    with pytest.raises(ConfigError) as error:
        load_config("default", overrides=[override])
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_presets_files_and_overrides_apply_in_order(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("[privacy]\nepsilon = 3.0\nclip_bound = 7\n")
    config = load_config("tiny", file, ["privacy.epsilon=4", "prune.always=a.*,b.*"])
    assert config.model.name == "tiny" and config.privacy.epsilon == 4.0 and config.privacy.clip_bound == 7.0
    assert config.prune.always == ("a.*", "b.*")
    assert Config.from_dict(config.to_dict()) == config


def test_optional_values_accept_auto():
    assert load_config("default", overrides=["privacy.noise_multiplier=auto"]).privacy.noise_multiplier is None
    assert load_config("default", overrides=["privacy.noise_multiplier=1.5"]).privacy.noise_multiplier == 1.5


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config("default", tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("default", bad)
    with pytest.raises(ConfigError, match="not a preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("epsilon")


def test_flower_run_config_is_the_simulate_preset_in_flowers_flattened_form():
    import tomllib
    from pathlib import Path

    from seedtune.common.config import Config

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    app_config = dict(pyproject["tool"]["flwr"]["app"]["config"])
    app_config.pop("run-dir")
    flat = {}

    def walk(node, prefix=""):  # Flower joins nested tables with dots
        for key, value in node.items():
            walk(value, f"{prefix}{key}.") if isinstance(value, dict) else flat.__setitem__(f"{prefix}{key}", value)

    walk(app_config)
    assert Config.from_flat(flat) == load_config("default", command="simulate")
    assert flat == load_config("default", command="simulate").to_flat()


@pytest.mark.parametrize("key", ["federation.fault_partition", "federation.fault_round"])
def test_fault_injection_is_a_test_hook_not_a_setting(key):
    with pytest.raises(ConfigError, match=f"{key} is not a setting: fault injection is a test hook"):
        load_config("tiny", overrides=[f"{key}=1"])
    logged = Config().to_dict()  # what an older seedtune logged for a run that injected nothing
    section, name = key.split(".")
    logged[section][name] = -1
    assert Config.from_dict(logged) == Config()


def test_a_renamed_key_still_works_under_its_old_name_and_warns():
    from seedtune.common.config import DeprecatedKeyWarning

    with pytest.warns(DeprecatedKeyWarning, match="federation.client_eval_sigma is deprecated: it is now "
                                                  "federation.silo_eval_std"):
        config = load_config("tiny", overrides=["federation.client_eval_sigma=3.5"])
    assert config.federation.silo_eval_std == 3.5
    logged = Config().to_dict()  # a run logged before the rename resumes with its own value
    logged["federation"]["client_eval_sigma"] = logged["federation"].pop("silo_eval_std") * 2
    with pytest.warns(DeprecatedKeyWarning):
        assert Config.from_dict(logged).federation.silo_eval_std == 10.0
    logged["federation"]["silo_eval_std"] = 1.0
    with pytest.raises(ConfigError, match="silo_eval_std is set twice, also under its old name"):
        Config.from_dict(logged)


@pytest.mark.parametrize("old, new, value", [("federation.clients", "federation.silos", 4),
                                             ("federation.min_clients", "federation.min_silos", 2),
                                             ("federation.client_eval", "federation.silo_eval", "private")])
def test_silos_are_silos_and_the_old_client_keys_still_work(old, new, value):
    from seedtune.common.config import DeprecatedKeyWarning

    with pytest.warns(DeprecatedKeyWarning, match=f"{old} is deprecated: it is now {new}"):
        config = load_config("tiny", overrides=[f"{old}={value}"], command="simulate")
    section, name = new.split(".")
    assert getattr(getattr(config, section), name) == value


@pytest.mark.parametrize("workers, cpus, processes, threads, turns", [
    (0, 2, 2, 1, 2),  # the default: a process a core, so one of them answers two of the 3 silos in turn
    (0, 8, 3, 2, 1),  # ... but at most one a silo, the spare cores shared out as threads
    (1, 2, 1, 2, 3),  # every silo in one process using every core: a round is three answers long
    (3, 2, 3, 1, 1),  # more processes than cores: one thread each
])
def test_a_simulation_runs_its_silos_in_the_processes_asked_for(workers, cpus, processes, threads, turns):
    from seedtune.jobs.simulate import answer_turns, simulation_backend

    federation = load_config("default", overrides=[f"federation.workers={workers}"]).federation
    backend = simulation_backend(federation, cpus)
    per_process = backend["client_resources"]["num_cpus"]
    assert per_process == threads  # Ray gives each process's torch this many threads
    assert backend["init_args"]["num_cpus"] // per_process == processes  # how Flower sizes its pool
    assert answer_turns(federation, cpus) == turns  # a round waits round_timeout for each


def test_a_round_waits_for_the_silos_asked_not_the_silos_there_are():
    from seedtune.jobs.simulate import answer_turns

    federation = load_config("default", overrides=["federation.silos=6", "federation.fraction=0.5",
                                                   "federation.workers=1"]).federation
    assert federation.asked == 3 and answer_turns(federation, cpus=2) == 3


def test_more_simulation_processes_than_silos_is_refused():
    with pytest.raises(ConfigError, match=r"federation.workers=4 is invalid: .*\[0, 3\]"):
        load_config("default", overrides=["federation.workers=4"])


def test_a_list_is_still_read_from_quoted_toml_or_commas():
    assert load_config("default", overrides=['prune.always=["a.*", "b"]']).prune.always == ("a.*", "b")
    assert load_config("default", overrides=["prune.always=a.*,b"]).prune.always == ("a.*", "b")


def test_an_empty_trainable_set_names_the_pattern_that_matched_nothing():
    from seedtune.common import components

    config = load_config("tiny", overrides=["prune.enabled=true", "prune.ratio=0", 'prune.always=["lm.model.norm.weight"]',
                                            "data.max_train_examples=20"])
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    with pytest.raises(ConfigError, match=r"no trainable coordinates: prune.always='lm.model.norm.weight' matches no "
                                          r"tensor of .*\(its last is 'classifier.bias'\); raise prune.ratio"):
        components.mask_for(config, task, data)
