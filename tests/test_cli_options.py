"""The CLI's shared options are shared: one --quiet, one --weights, one auto|FLOAT type, *_cmd names."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.cli.options import AutoOrFloat


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out = {}
    for name, cmd in group.commands.items():
        out[prefix + name] = cmd
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, f"{prefix}{name} "))
    return out


COMMANDS = _commands(main)


def _option(cmd: click.Command, name: str) -> click.Option | None:
    return next((p for p in cmd.params if isinstance(p, click.Option) and p.name == name), None)


def test_every_command_function_is_named_for_its_command():
    for name, cmd in COMMANDS.items():
        assert cmd.callback.__name__ == name.split()[-1].replace("-", "_") + "_cmd", name


def test_quiet_is_the_same_flag_everywhere():
    quiet = {n: _option(c, "quiet") for n, c in COMMANDS.items() if _option(c, "quiet")}
    assert {"extract", "predict", "evaluate", "fit-head", "finetune", "compare", "plot"} <= set(quiet)
    assert {tuple(o.opts) for o in quiet.values()} == {("--quiet", "-q")}
    assert all(o.is_flag for o in quiet.values())


def test_weights_is_one_option():
    weights = [_option(c, "weights") for c in COMMANDS.values() if _option(c, "weights")]
    assert len(weights) >= 3  # export, extract, finetune
    assert len({(o.help, type(o.type), o.type.exists) for o in weights}) == 1


def test_every_auto_or_number_option_uses_the_one_type():
    metavars = {(n, o.name): o for n, c in COMMANDS.items() for o in c.params
                if isinstance(o, click.Option) and (o.metavar or "").lower().startswith("auto|")}
    assert {("fit-head", "C"), ("finetune", "lp_C")} <= set(metavars)
    assert all(isinstance(o.type, AutoOrFloat) for o in metavars.values()), metavars


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("0.5", 0.5), ("10", 10.0), (2.0, 2.0)])
def test_auto_or_float_converts(value, expected):
    assert AutoOrFloat().convert(value, None, None) == expected


@pytest.mark.parametrize("value, message", [("x", "neither 'auto' nor a number"), ("0", "must be > 0"),
                                            ("-1", "must be > 0"), ("nan", "must be > 0")])
def test_auto_or_float_refuses_with_one_message(value, message):
    with pytest.raises(click.BadParameter, match=message):
        AutoOrFloat().convert(value, None, None)


def test_fit_head_and_finetune_refuse_a_bad_C_before_any_work(tmp_path):
    for args in (["fit-head", "--C", "zero"], ["finetune", str(tmp_path), "--lp-C", "zero"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "neither 'auto' nor a number" in r.output, args


def test_help_texts_print_percent_signs_once():
    # click does not %-format help, so an escaped "%%" reaches the user as it is written
    runner = CliRunner()
    for name in COMMANDS:
        out = runner.invoke(main, [*name.split(), "--help"], terminal_width=200)
        assert out.exit_code == 0, (name, out.output)
        assert "%%" not in out.output, name
