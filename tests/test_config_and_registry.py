"""build() / build_from_spec(): overrides, validation errors naming the valid choices, round trips;
the pluggy registry: list_parts(), duplicate names, run-time plugins and observer hooks."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import random_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import (
    ConfigError,
    DuplicateRegistrationError,
    MethodSpec,
    PartChoice,
    Pipeline,
    UnknownNameError,
    build,
    build_from_spec,
    hookimpl,
    list_parts,
    register_plugin,
    unregister_plugin,
)
from kvpress_like import plugins as plugins_module
from kvpress_like.parts import PartConfig, Scorer

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

CORE_WINDOWS = {"suffix", "pseudo", "semantic", "question"}


def _valid_names(kind: str) -> list[str]:
    return [entry["name"] for entry in list_parts()[kind]]


# ----------------------------------------------------------------------------------------------
# build(): the method's defaults and the three kinds of override
# ----------------------------------------------------------------------------------------------


def test_dapq_defaults_follow_the_paper():
    pipeline = build("dapq", budget=256)
    assert isinstance(pipeline, Pipeline)
    config = pipeline.config
    assert config["method"] == "dapq"
    assert config["budget"] == {"tokens": 256}
    assert config["window"] == {"name": "pseudo", "n_pseudo": 32, "content": "prefix_suffix", "prefix": 4,
                                "seed": 0, "filler_id": None, "position_offset": 0}
    assert config["scorer"]["name"] == "attention"
    assert {k: config["scorer"][k] for k in ("aggregation", "gqa", "pooling", "softmax_domain")} == {
        "aggregation": "sum", "gqa": "mean", "pooling": "none", "softmax_domain": "visible"}
    assert config["allocator"]["name"] == "uniform"
    assert config["selector"]["name"] == "topk"
    assert config["selector"]["sinks"] == 0 and config["selector"]["recent"] == 0


def test_string_override_swaps_the_part_with_its_defaults():
    pipeline = build("dapq", budget=64, window="semantic")
    assert pipeline.window.name == "semantic"
    # the method's options for 'pseudo' are not carried over blindly, the new part's defaults apply
    assert pipeline.config["window"]["position_start"] == 0
    assert "position_offset" not in pipeline.config["window"]
    suffix = build("dapq", budget=64, window="suffix")
    assert suffix.config["window"] == {"name": "suffix", "size": 32}
    # the other parts are untouched
    assert suffix.config["scorer"] == build("dapq", budget=64).config["scorer"]


def test_dict_override_merges_into_the_methods_part():
    pipeline = build("dapq", budget=64, scorer={"pooling": "max", "kernel": 5}, window={"n_pseudo": 16})
    scorer, window = pipeline.config["scorer"], pipeline.config["window"]
    assert (scorer["name"], scorer["pooling"], scorer["kernel"]) == ("attention", "max", 5)
    assert scorer["aggregation"] == "sum"  # kept from the method
    assert (window["name"], window["n_pseudo"], window["prefix"]) == ("pseudo", 16, 4)


def test_dict_override_with_the_same_name_still_merges():
    window = build("dapq", budget=64, window={"name": "pseudo", "prefix": 2}).config["window"]
    assert (window["n_pseudo"], window["prefix"]) == (32, 2)


def test_dict_override_with_another_name_starts_from_that_parts_defaults():
    pipeline = build("dapq", budget=64, window={"name": "suffix", "size": 8})
    assert pipeline.config["window"] == {"name": "suffix", "size": 8}
    assert pipeline.window.plan(random_ids(20)).window_rows.tolist() == list(range(12, 20))


def test_part_choice_override():
    pipeline = build("dapq", budget=64, selector=PartChoice(name="topk", options={"sinks": 4, "recent": 8}))
    assert (pipeline.config["selector"]["sinks"], pipeline.config["selector"]["recent"]) == (4, 8)


def test_override_changes_behaviour_not_only_config():
    """An ablation is a config change: the swapped part is the one that runs."""
    model, ids = tiny_model("llama", initializer_range=0.3), random_ids(64, seed=2)
    pseudo = build("dapq", budget=8).prefill(model, ids).report.kept_indices
    recent = build("dapq", budget=8, selector={"recent": 8}).prefill(model, ids).report.kept_indices
    assert all(torch.equal(k, torch.arange(56, 64).expand_as(k)) for k in recent.values())
    assert any(not torch.equal(pseudo[i], recent[i]) for i in pseudo)


# ----------------------------------------------------------------------------------------------
# errors that list the valid choices
# ----------------------------------------------------------------------------------------------


def test_unknown_method_lists_the_valid_methods():
    with pytest.raises(UnknownNameError) as info:
        build("dapqq", budget=8)
    message = str(info.value)
    assert "unknown method 'dapqq'" in message
    assert "dapq" in message.split("valid methods are:")[1]
    assert set(_valid_names("method")) <= set(info.value.valid)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    ("override", "label", "must_list"),
    [
        ({"window": "pseudoo"}, "window builder", CORE_WINDOWS),
        ({"scorer": "attn"}, "scorer", {"attention"}),
        ({"allocator": {"name": "uniformm"}}, "allocator", {"uniform"}),
        ({"selector": "top_k"}, "selector", {"topk"}),
    ],
)
def test_unknown_part_lists_the_valid_parts(override, label, must_list):
    with pytest.raises(UnknownNameError) as info:
        build("dapq", budget=8, **override)
    message = str(info.value)
    assert message.startswith(f"unknown {label} ")
    listed = set(message.split("are: ")[1].split(", "))
    assert must_list <= listed


def test_unknown_override_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        build("dapq", budget=8, windows="suffix")
    message = str(info.value)
    assert "windows" in message
    for kind in ("window", "scorer", "allocator", "selector"):
        assert kind in message.split("valid overrides are:")[1]


@pytest.mark.parametrize(
    ("override", "bad", "valid"),
    [
        ({"scorer": {"poolin": "avg"}}, "poolin", "pooling='none'"),
        ({"window": {"size": 8}}, "size", "n_pseudo=32"),  # 'size' belongs to suffix, not pseudo
        ({"selector": {"sink": 4}}, "sink", "sinks=0"),
        ({"window": {"name": "suffix", "n_pseudo": 8}}, "n_pseudo", "size=32"),
    ],
)
def test_unknown_option_key_lists_the_valid_options(override, bad, valid):
    with pytest.raises(ConfigError) as info:
        build("dapq", budget=8, **override)
    message = str(info.value)
    assert bad in message
    assert "valid options (with defaults):" in message
    assert valid in message


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"scorer": {"kernel": 4}}, "kernel must be odd"),
        ({"scorer": {"pooling": "median"}}, "'none', 'avg' or 'max'"),
        ({"window": {"prefix": 40}}, "cannot exceed n_pseudo"),
        ({"window": {"n_pseudo": 0}}, "n_pseudo"),
        ({"window": {"name": "suffix", "size": 0}}, "size"),
        ({"selector": {"sinks": -1}}, "sinks"),
    ],
)
def test_invalid_option_values_point_at_the_field(override, fragment):
    with pytest.raises(ConfigError) as info:
        build("dapq", budget=8, **override)
    assert fragment in str(info.value)


def test_override_of_the_wrong_type():
    with pytest.raises(ConfigError, match="window must be a part name or a dict of options, got int"):
        build("dapq", budget=8, window=3)


# ----------------------------------------------------------------------------------------------
# build_from_spec: dicts, YAML files, round trips
# ----------------------------------------------------------------------------------------------


def test_build_from_spec_dict_equals_build():
    spec = {"method": "dapq", "budget": "3%", "window": {"n_pseudo": 16}, "scorer": "attention",
            "selector": {"sinks": 2}}
    expected = build("dapq", budget="3%", window={"n_pseudo": 16}, scorer="attention", selector={"sinks": 2})
    assert build_from_spec(spec).config == expected.config


def test_build_from_spec_without_method_uses_uniform_topk():
    pipeline = build_from_spec({"budget": 16, "window": {"name": "suffix", "size": 4}, "scorer": "attention"})
    assert pipeline.config["allocator"] == {"name": "uniform"}
    assert pipeline.config["selector"]["name"] == "topk"
    assert pipeline.config["window"] == {"name": "suffix", "size": 4}


def test_build_from_yaml_file(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text(
        "method: dapq\n"
        "budget: 64\n"
        "window: semantic\n"
        "scorer:\n"
        "  pooling: avg\n"
        "  kernel: 5\n"
    )
    expected = build("dapq", budget=64, window="semantic", scorer={"pooling": "avg", "kernel": 5})
    assert build_from_spec(path).config == expected.config
    assert build_from_spec(str(path)).config == expected.config


def test_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_from_spec(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- dapq\n- 64\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_from_spec(listing)
    with pytest.raises(ConfigError) as info:
        build_from_spec({"method": "dapq", "budget": 8, "windw": "suffix"})
    assert "windw" in str(info.value) and "valid keys are: method, budget, window" in str(info.value)
    with pytest.raises(ConfigError, match="must name its window and scorer"):
        build_from_spec({"budget": 8})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build_from_spec({"budget": 8, "window": {"size": 3}, "scorer": "attention"})
    with pytest.raises(ConfigError, match="budget is required"):
        build_from_spec({"method": "dapq"})


@st.composite
def pipeline_overrides(draw):
    overrides = {}
    window = draw(st.sampled_from([None, "suffix", "pseudo", "semantic", "question"]))
    if window == "suffix":
        overrides["window"] = {"name": "suffix", "size": draw(st.integers(1, 64))}
    elif window in ("pseudo", "semantic"):
        n = draw(st.integers(1, 64))
        overrides["window"] = {"name": window, "n_pseudo": n, "prefix": draw(st.integers(0, n)),
                               "content": draw(st.sampled_from(["prefix_suffix", "random"]))}
    elif window == "question":
        overrides["window"] = "question"
    if draw(st.booleans()):
        overrides["scorer"] = {
            "aggregation": draw(st.sampled_from(["sum", "mean"])),
            "gqa": draw(st.sampled_from(["mean", "max"])),
            "pooling": draw(st.sampled_from(["none", "avg", "max"])),
            "kernel": draw(st.sampled_from([1, 3, 5, 7, 9])),
            "softmax_domain": draw(st.sampled_from(["visible", "prompt"])),
        }
    if draw(st.booleans()):
        overrides["selector"] = {"sinks": draw(st.integers(0, 8)), "recent": draw(st.integers(0, 32))}
    budget = draw(st.one_of(st.integers(1, 4096), st.floats(0.001, 1.0), st.integers(1, 100).map(lambda p: f"{p}%")))
    return budget, overrides


@settings(max_examples=60, deadline=None)
@given(case=pipeline_overrides())
def test_config_round_trips_through_build_from_spec_and_yaml(case, tmp_path_factory):
    budget, overrides = case
    pipeline = build("dapq", budget=budget, **overrides)
    config = pipeline.config
    assert build_from_spec(config).config == config
    path = tmp_path_factory.mktemp("spec") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert build_from_spec(path).config == config
    # and the parts really are the configured ones
    rebuilt = build_from_spec(config)
    for kind in ("window", "scorer", "allocator", "selector"):
        assert getattr(rebuilt, kind).config == getattr(pipeline, kind).config
        assert type(getattr(rebuilt, kind)) is type(getattr(pipeline, kind))


def _registered_methods() -> list[str]:
    return sorted(plugins_module.get_registry().methods)


@pytest.mark.parametrize(
    "method",
    _registered_methods(),
)
def test_every_registered_method_round_trips(method):
    spec = plugins_module.get_registry().method(method)
    uses_budget = plugins_module.get_registry().part_class("allocator", spec.allocator.name).uses_budget
    pipeline = build(method, budget=16) if uses_budget else build(method)
    assert build_from_spec(pipeline.config).config == pipeline.config


def test_round_trip_of_a_spec_without_method():
    pipeline = build_from_spec({"budget": 16, "window": "suffix", "scorer": "attention"})
    assert build_from_spec(pipeline.config).config == pipeline.config


# ----------------------------------------------------------------------------------------------
# list_parts
# ----------------------------------------------------------------------------------------------


def test_list_parts_contents():
    catalog = list_parts()
    assert {"window", "scorer", "allocator", "selector", "method"} <= set(catalog)
    assert set(_valid_names("window")) >= CORE_WINDOWS
    assert "attention" in _valid_names("scorer")
    assert "uniform" in _valid_names("allocator")
    assert "topk" in _valid_names("selector")
    assert "dapq" in _valid_names("method")
    for kind in ("window", "scorer", "allocator", "selector"):
        names = _valid_names(kind)
        assert names == sorted(names)
        for entry in catalog[kind]:
            assert entry["summary"], entry
            assert entry["plugin"], entry  # who registered it (built-ins: their module)
            for option in entry["options"].values():
                assert option["description"], (entry["name"], option)

    windows = {entry["name"]: entry for entry in catalog["window"]}
    assert all(windows[name]["plugin"] == "kvpress_like.windows" for name in CORE_WINDOWS)
    assert {k: v["default"] for k, v in windows["pseudo"]["options"].items()} == {
        "n_pseudo": 32, "content": "prefix_suffix", "prefix": 4, "seed": 0, "filler_id": None, "position_offset": 0}
    assert windows["suffix"]["options"]["size"]["default"] == 32
    assert windows["question"]["options"] == {}
    scorer = next(entry for entry in catalog["scorer"] if entry["name"] == "attention")
    assert scorer["plugin"] == "kvpress_like.scorers.attention"
    assert scorer["options"]["kernel"]["default"] == 7
    dapq = next(entry for entry in catalog["method"] if entry["name"] == "dapq")
    assert dapq["plugin"] == "kvpress_like.methods.dapq"
    assert dapq["window"] == {"name": "pseudo", "options": {"n_pseudo": 32, "prefix": 4}}
    assert "2603.11564" in dapq["paper"]


# ----------------------------------------------------------------------------------------------
# plugins: duplicates, run-time registration, observers
# ----------------------------------------------------------------------------------------------


class ReverseScorer(Scorer):
    """Test scorer: later tokens score higher (keeps the most recent tokens)."""

    name = "test_recency"
    summary = "test: score = position"

    def score(self, ctx):
        positions = torch.arange(ctx.prompt_length, dtype=torch.float32, device=ctx.keys.device)
        return positions.expand(ctx.keys.shape[0], ctx.keys.shape[1], -1)


class _Registers:
    def __init__(self, scorer_classes):
        self.scorer_classes = scorer_classes

    @hookimpl
    def register_scorers(self):
        return self.scorer_classes


def test_two_plugins_registering_the_same_name_are_named_in_the_error():
    first, second = _Registers([ReverseScorer]), _Registers([ReverseScorer])
    register_plugin(first, name="first-plugin")
    try:
        assert build("dapq", budget=4, scorer="test_recency").scorer.name == "test_recency"
        register_plugin(second, name="second-plugin")
        try:
            with pytest.raises(DuplicateRegistrationError) as info:
                build("dapq", budget=4)
            message = str(info.value)
            assert "scorer 'test_recency' is registered twice" in message
            assert "'first-plugin'" in message and "'second-plugin'" in message
        finally:
            unregister_plugin(second)
        assert build("dapq", budget=4, scorer="test_recency").scorer.name == "test_recency"
    finally:
        unregister_plugin(first)
    with pytest.raises(UnknownNameError):
        build("dapq", budget=4, scorer="test_recency")


def test_a_plugin_cannot_silently_shadow_a_builtin():
    class Attention(ReverseScorer):
        name = "attention"

    plugin = _Registers([Attention])
    register_plugin(plugin, name="shadowing-plugin")
    try:
        with pytest.raises(DuplicateRegistrationError) as info:
            build("dapq", budget=4)
        assert "kvpress_like.scorers.attention" in str(info.value)
        assert "shadowing-plugin" in str(info.value)
    finally:
        unregister_plugin(plugin)
    assert type(build("dapq", budget=4).scorer).__module__.endswith("scorers.attention")


def test_registering_something_that_is_not_a_part_is_a_type_error():
    plugin = _Registers([dict])
    register_plugin(plugin, name="broken-plugin")
    try:
        with pytest.raises(TypeError, match="broken-plugin"):
            build("dapq", budget=4)
    finally:
        unregister_plugin(plugin)


def test_plugin_names_survive_registration_before_first_use(monkeypatch):
    monkeypatch.setattr(plugins_module, "_manager", None)
    monkeypatch.setattr(plugins_module, "_registry", None)
    monkeypatch.setattr(plugins_module, "_extra_plugins", [])
    first, second = _Registers([ReverseScorer]), _Registers([ReverseScorer])
    register_plugin(first, name="first-plugin")
    register_plugin(second, name="second-plugin")
    try:
        with pytest.raises(DuplicateRegistrationError) as info:
            build("dapq", budget=4)
        assert "'first-plugin'" in str(info.value) and "'second-plugin'" in str(info.value)
    finally:
        unregister_plugin(second)
        unregister_plugin(first)


class RecentOnlyConfig(PartConfig):
    offset: int = 0


class RuntimeMethodPlugin:
    """A third-party plugin: one scorer with options and one method that uses it."""

    class Scorer(ReverseScorer):
        name = "test_recency_offset"
        summary = "test: score = position, shifted"
        Config = RecentOnlyConfig

    @hookimpl
    def register_scorers(self):
        return [self.Scorer]

    @hookimpl
    def register_methods(self):
        return [
            MethodSpec(
                name="test_recent_method",
                summary="keeps the latest tokens (test)",
                window=PartChoice(name="suffix", options={"size": 1}),
                scorer=PartChoice(name="test_recency_offset", options={"offset": 1}),
            )
        ]


def test_runtime_plugin_becomes_buildable_and_listed():
    plugin = RuntimeMethodPlugin()
    register_plugin(plugin, name="runtime-plugin")
    try:
        pipeline = build("test_recent_method", budget=5)
        assert pipeline.config["scorer"] == {"name": "test_recency_offset", "offset": 1}
        model = tiny_model("qwen2")
        report = pipeline.prefill(model, random_ids(30)).report
        assert report.layers
        for kept in report.kept_indices.values():
            assert torch.equal(kept, torch.arange(25, 30).expand_as(kept))
        methods = {entry["name"]: entry for entry in list_parts()["method"]}
        assert methods["test_recent_method"]["plugin"] == "runtime-plugin"
        scorers = {entry["name"]: entry for entry in list_parts()["scorer"]}
        assert scorers["test_recency_offset"]["options"]["offset"]["default"] == 0
        # the built-in method can use the plugin's part too
        assert build("dapq", budget=5, scorer="test_recency_offset").scorer.name == "test_recency_offset"
    finally:
        unregister_plugin(plugin)
    with pytest.raises(UnknownNameError):
        build("test_recent_method", budget=5)
    assert "test_recent_method" not in _valid_names("method")


class Observer:
    def __init__(self):
        self.layers, self.prefills = [], []

    @hookimpl
    def layer_compressed(self, layer_report, pipeline):
        self.layers.append((layer_report, pipeline))

    @hookimpl
    def prefill_compressed(self, report, pipeline):
        self.prefills.append((report, pipeline))


@pytest.mark.parametrize("window", ["pseudo", "suffix"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_observer_hooks_receive_the_reports(arch, window):
    observer = Observer()
    register_plugin(observer, name="observer-plugin")
    try:
        model = tiny_model(arch)
        pipeline = build("dapq", budget=6, window=window)
        result = pipeline.prefill(model, random_ids(40))
    finally:
        unregister_plugin(observer)
    report = result.report
    assert len(observer.prefills) == 1
    assert observer.prefills[0][0] is report
    assert observer.prefills[0][1] is pipeline
    assert report.cache_bytes_after > 0 and report.cache_bytes_before > report.cache_bytes_after
    assert [lr.layer_idx for lr, _ in observer.layers] == sorted(report.layers)
    for layer_report, seen_pipeline in observer.layers:
        assert seen_pipeline is pipeline
        assert layer_report is report.layers[layer_report.layer_idx]
        assert torch.equal(layer_report.kept_indices, report.kept_indices[layer_report.layer_idx])
        assert layer_report.budget == 6
    # unregistered: no more calls
    pipeline.prefill(model, random_ids(40))
    assert len(observer.prefills) == 1
