"""options.py: an option is one field declaration; the parser, the configuration and the checks of
`python train.py` all come from those declarations."""
import argparse
from dataclasses import dataclass, field

import pytest

import em_nat
from options import add_options, check_minimums, option, options_within, values
from train import TRAIN_PRESETS


@dataclass
class Inner:
    count: int = option(3, "a count", minimum=1)
    name: str = option("a", "a name", choices=["a", "b"])
    kept: float = 0.5                                     # not an option


@dataclass
class Outer:
    switch: bool = option(False, "a switch")
    inner: Inner = field(default_factory=Inner)
    rate: float = option(1.0, "decided later", cli_default=None, flag="--the-rate", group="other")


def parser_of(*configs):
    parser = argparse.ArgumentParser()
    add_options(parser, (("main", Outer, Inner), ("other",)), *configs)
    return parser


def test_a_field_declared_as_an_option_is_parsed_typed_and_read_back():
    args = parser_of(Outer).parse_args(["--count", "5", "--switch", "--the-rate", "2",
                                        "--name", "b"])
    assert Inner(**values(Inner, args)) == Inner(count=5, name="b")
    assert Outer(**values(Outer, args)) == Outer(switch=True, rate=2.0)
    defaults = parser_of(Outer).parse_args([])
    assert Inner(**values(Inner, defaults)) == Inner() and defaults.rate is None
    assert Outer(**values(Outer, defaults, rate=7.0)).rate == 7.0          # decided from others
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser_of(Outer)._action_groups}
    assert groups["main"] == ["switch", "count", "name"] and groups["other"] == ["rate"]
    with pytest.raises(SystemExit):
        parser_of(Outer).parse_args(["--name", "c"])                       # not a choice
    with pytest.raises(SystemExit):
        parser_of(Outer).parse_args(["--kept", "1"])                       # not an option


def test_a_minimum_is_refused_in_one_line_naming_the_option():
    check_minimums(parser_of(Outer).parse_args(["--count", "1"]), Outer)
    with pytest.raises(ValueError, match="^--count must be at least 1, not 0$"):
        check_minimums(parser_of(Outer).parse_args(["--count", "0"]), Outer)


def test_train_py_defaults_are_the_configurations_defaults():
    # One declaration per option: with no option given, the run configuration is the dataclasses'
    # defaults, except what depends on other options (the preset's schedule, the run directory).
    cfg = em_nat.run_config(em_nat.build_parser().parse_args(["--device", "cpu"]))
    assert (cfg.data, cfg.em, cfg.report) == (em_nat.DataConfig(), em_nat.EMConfig(),
                                              em_nat.ReportConfig())
    assert (cfg.preset, cfg.out, cfg.seed, cfg.threads) == ("toy", "runs/toy-toy", 1, None)
    assert cfg.train == em_nat.TrainConfig(**TRAIN_PRESETS["toy"], device="cpu")
    parsed = em_nat.build_parser().parse_args(["--device", "cpu", "--em-iterations", "4",
                                               "--seed", "3", "--quality-margin", "0.5x"])
    cfg = em_nat.run_config(parsed)
    assert (cfg.em.iterations, cfg.em.quality_margin, cfg.seed, cfg.train.seed) == (4, "0.5x", 3, 3)


def test_every_option_of_train_py_is_one_configuration_field():
    declared = [f.name for config in (em_nat.RunConfig, em_nat.Studies)
                for _, f, _ in options_within(config)]
    parsed = [a.dest for a in em_nat.build_parser()._actions if a.dest != "help"]
    assert sorted(declared) == sorted(parsed) and len(set(declared)) == len(declared)
    assert "--em-iterations N" in em_nat.build_parser().format_help()
