"""Every setting declares its rules next to its default (issue 44): its check, what a resume may do with it,
whether it is part of a study's set-up and whether it can be searched. The lists the resume, the sharded
checkpoints and the search use are derived from the declarations; the twelve settings once in none of the lists
have a decided rule, and each refusing rule is tested on a resume. The settings are small groups, each declared in
the subpackage that uses it and handed only to the components that need it."""
import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models import TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.checkpoints import RunCheckpoints
from utils.training.checkpoints.resume import compared_on_resume
from utils.training.data import source_options
from utils.training.metrics import GradientStats
from utils.training.model import set_up_model
from utils.training.search.search_space import NOT_SEARCHABLE
from utils.training.search.search_study import NOT_IN_SETUP
from utils.training.setting_rules import (FREE, MATCH, PER_PROCESS, RAISE, RESUME_CONDITIONS, RESUME_RULES, RULES_KEY,
                                          setting)
from utils.training.settings import KEYWORD_ORDER, FineTuneSettings, RunSettings

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
# The twelve settings that were in none of the resume, per-process and study lists, and their decided rules
# (the reasons are beside each declaration in the groups and in CLAUDE.md's decisions table).
TWELVE = {"n_epochs": RAISE, "max_steps": RAISE, "pad_to_multiple_of": FREE, "stream_buffer_size": MATCH,
          "bad_examples": MATCH, "val_fraction": MATCH, "loss_path": MATCH, "compile": MATCH, "deterministic": FREE,
          "fsdp": FREE, "early_stopping_patience": FREE, "eval_every": FREE}
# Where each group is declared: the subpackage (or top-level module) that uses it. A new group names its home here.
GROUP_HOMES = {"run": "utils.training.settings", "optimisation": "utils.training.optim",
               "numerics": "utils.training.precision", "data": "utils.training.data.",
               "model": "utils.training.model.", "distributed": "utils.training.distributed.",
               "checkpoints": "utils.training.checkpoints.", "logging": "utils.training.metrics."}


def undeclared(group_class) -> list:
    """Fields whose rules are missing or not one of the declared kinds."""
    bad = []
    for field in dataclasses.fields(group_class):
        rules = field.metadata.get(RULES_KEY)
        if (rules is None or not callable(rules.check) or rules.resume not in RESUME_RULES
                or not isinstance(rules.setup, bool) or not isinstance(rules.search, bool)
                or rules.when not in RESUME_CONDITIONS or (rules.when is not None and rules.resume != MATCH)):
            bad.append(field.name)
    return bad


def group_fields() -> list[tuple[str, str]]:
    """(group, field) for every field of every group dataclass."""
    return [(group, field.name) for group, kind in FineTuneSettings.group_types().items()
            for field in dataclasses.fields(kind)]


def test_every_setting_declares_its_four_rules():
    for group, kind in FineTuneSettings.group_types().items():
        assert not undeclared(kind), f"declare each field of the {group} group with setting_rules.setting(...)"
    assert len(group_fields()) >= 43


def test_a_setting_without_declared_rules_is_caught():
    with_plain = dataclasses.make_dataclass("WithPlain", [("extra", int, dataclasses.field(default=1))],
                                            bases=(RunSettings,))
    declared = dataclasses.make_dataclass("Declared", [("extra", int, setting(1, check=lambda name, value: None,
                                                                              resume=FREE, setup=False,
                                                                              search=False))],
                                          bases=(RunSettings,))
    assert undeclared(with_plain) == ["extra"]
    assert undeclared(declared) == []
    composed = dataclasses.make_dataclass("Composed", [("run", with_plain, dataclasses.field(
        default_factory=with_plain))], bases=(FineTuneSettings,), init=False)
    with pytest.raises(KeyError):
        composed().validate()  # the rules are read from the declarations: an undeclared field cannot pass


def test_every_setting_belongs_to_exactly_one_group_and_keeps_its_flat_place():
    names = [name for _, name in group_fields()]
    assert sorted(names) == sorted(set(names)), "a keyword declared in two groups"
    assert sorted(KEYWORD_ORDER) == sorted(names), "KEYWORD_ORDER (settings.py) names every group's every field once"
    assert list(FineTuneSettings().as_dict()) == list(KEYWORD_ORDER) == list(FineTuneSettings.rules())
    flat = FineTuneSettings(batch_size=8, checkpoint_every=3, precision="bf16", log_every=2)  # flat keywords
    assert (flat.data.batch_size, flat.checkpoints.checkpoint_every, flat.numerics.precision,
            flat.logging.log_every) == (8, 3, "bf16", 2)
    assert flat.as_dict() == dict(FineTuneSettings().as_dict(), batch_size=8, checkpoint_every=3, precision="bf16",
                                  log_every=2)
    with pytest.raises(TypeError, match="batch_sizes"):
        FineTuneSettings(batch_sizes=8)


def test_each_group_is_declared_in_the_subpackage_that_uses_it():
    assert set(FineTuneSettings.group_types()) == set(GROUP_HOMES)
    for group, kind in FineTuneSettings.group_types().items():
        home = GROUP_HOMES[group]
        assert kind.__module__ == home or (home.endswith(".") and kind.__module__.startswith(home)), (
            f"the {group} group ({kind.__module__}.{kind.__name__}) belongs in {home}")


def test_components_are_handed_only_their_group():
    def annotation(function, parameter):
        return inspect.signature(function).parameters[parameter].annotation

    assert annotation(RunCheckpoints.__init__, "settings") == "CheckpointSettings"
    assert annotation(source_options, "data") == "DataSettings"
    assert annotation(GradientStats.record_if_due, "logging") == "LoggingSettings"
    assert (annotation(set_up_model, "numerics"), annotation(set_up_model, "data")) == ("NumericsSettings",
                                                                                        "DataSettings")
    # Below the run only the search (which runs whole trials) knows the whole settings object.
    seams = Path(__file__).resolve().parent.parent / "utils" / "training"
    knowing = sorted(str(path.relative_to(seams)) for path in seams.glob("*/*.py")
                     if "FineTuneSettings" in path.read_text() and path.parent.name != "search")
    assert not knowing, f"hand these their group instead of FineTuneSettings: {knowing}"


def test_the_lists_are_derived_from_the_declarations():
    rules = FineTuneSettings.rules()
    assert NOT_SEARCHABLE == {name for name, r in rules.items() if not r.search}
    assert NOT_IN_SETUP == {name for name, r in rules.items() if not r.setup}
    assert set(compared_on_resume(rules)) == {name for name, r in rules.items() if r.resume in (MATCH, PER_PROCESS)}
    assert NOT_SEARCHABLE <= NOT_IN_SETUP  # what cannot be searched does not change a trial's value either


def test_the_twelve_settings_have_their_decided_rules():
    rules = FineTuneSettings.rules()
    assert {name: rules[name].resume for name in TWELVE} == TWELVE


# -- the refusing rules on a resume ------------------------------------------------------------------------
class Reiterable:
    """A stream: an iterable of examples without a length (iterating starts over)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def _lines(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _fit(train, val, out, **keywords):
    torch.manual_seed(0)
    settings = dict(batch_size=4, learning_rate=3e-3, progress=False, save_plots=False, output_dir=str(out),
                    checkpoint_every=2)
    return test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, train, val, **dict(settings, **keywords))


STREAM = dict(max_steps=4, stream_buffer_size=8)
STREAM_ROWS, VAL_ROWS, LIST_ROWS = _lines(40), _lines(8, seed=1), _lines(16)


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    """A finished stream run with checkpoints: each refused resume below leaves it as it is."""
    out = tmp_path_factory.mktemp("stream")
    _fit(Reiterable(STREAM_ROWS), VAL_ROWS, out, **STREAM)
    return out


@pytest.fixture(scope="module")
def list_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("list")
    _fit(LIST_ROWS, VAL_ROWS, out, n_epochs=1, loss_path="chunked")
    return out


@pytest.mark.parametrize("name,value", [("stream_buffer_size", 16), ("bad_examples", "skip")])
def test_a_stream_resumed_with_another_setting_is_refused_naming_it(stream_run, name, value):
    with pytest.raises(ValueError, match=f"{name}=.*this run has {name}={value!r}"):
        _fit(Reiterable(STREAM_ROWS), VAL_ROWS, stream_run, resume_from_checkpoint=True,
             **dict(STREAM, **{name: value}))


@pytest.mark.parametrize("name,value", [("loss_path", "auto"), ("compile", True)])
def test_another_loss_path_or_compile_is_refused_naming_it(list_run, name, value):
    with pytest.raises(ValueError, match=f"{name}=.*this run has {name}={value!r}"):
        _fit(LIST_ROWS, VAL_ROWS, list_run, n_epochs=2, resume_from_checkpoint=True,
             **dict({"loss_path": "chunked"}, **{name: value}))


def test_stream_settings_are_free_where_no_stream_is_read(tmp_path):
    first = _fit(LIST_ROWS, VAL_ROWS, tmp_path, n_epochs=1)
    resumed = _fit(LIST_ROWS, VAL_ROWS, tmp_path, n_epochs=2, resume_from_checkpoint=True,
                   stream_buffer_size=16, bad_examples="skip")
    assert resumed["resumed_from_step"] == first["global_step"] and resumed["global_step"] == 2 * first["global_step"]


def test_another_val_fraction_is_refused_naming_it_when_validation_is_held_out(tmp_path):
    rows = _lines(20)
    _fit(rows, None, tmp_path, n_epochs=1, val_fraction=0.2)
    with pytest.raises(ValueError, match="val_fraction=0.2, this run has val_fraction=0.3"):
        _fit(rows, None, tmp_path, n_epochs=2, val_fraction=0.3, resume_from_checkpoint=True)
    # With val_data given, val_fraction is not used: another value changes nothing and is accepted.
    first = _fit(rows, VAL_ROWS, tmp_path / "given", n_epochs=1, val_fraction=0.2)
    resumed = _fit(rows, VAL_ROWS, tmp_path / "given", n_epochs=2, val_fraction=0.3, resume_from_checkpoint=True)
    assert resumed["resumed_from_step"] == first["global_step"]
