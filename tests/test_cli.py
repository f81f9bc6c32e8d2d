"""The CLI as a user meets it: every option explained with its default, bad input refused at once in one line."""

import argparse
import time

import pytest

from kvcompress.calibration.cli import build_parser, main


def _subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", sorted(_subcommands(build_parser())))
def test_every_option_has_help_and_shows_its_default(name):
    command = _subcommands(build_parser())[name]
    assert command.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"kvcompress {name} {action.option_strings or action.dest} has no help"
        assert "(default:" not in action.help  # the formatter adds it once
    if len(command._actions) > 1:
        assert "(default:" in command.format_help()


def test_the_sidecar_default_is_the_shipped_merge_ratio():
    args = build_parser().parse_args(["calibrate", "--method", "sidecar", "--output", "x"])
    assert (args.merge_window, args.slots) == (32, 4)  # 8:1, as kvcompress/smollm2-135m-instruct-sidecar-8x


def _refused_at_once(argv, message, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert time.perf_counter() - started < 1.0  # before any model is loaded
    text = str(exit_.value.code) + capsys.readouterr().err
    assert exit_.value.code != 0 and message in text, text


@pytest.mark.parametrize("value", ["1.5", "-0.2", "0", "1"])
def test_a_memory_target_outside_0_1_is_refused_before_any_work(value, capsys, tmp_path):
    _refused_at_once(["calibrate", "--method", "pca", "--target-memory-reduction", value, "--output", str(tmp_path / "out")], "in (0, 1)", capsys)


def test_output_is_checked_before_any_work(capsys, tmp_path):
    existing = tmp_path / "artifact"
    existing.mkdir()
    (existing / "compressor_config.json").write_text("{}")
    (existing / "stale.json").write_text("{}")
    _refused_at_once(["calibrate", "--method", "gate", "--output", str(existing)], "pass --overwrite", capsys)
    assert (existing / "stale.json").exists()  # nothing was touched
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused_at_once(["calibrate", "--method", "gate", "--output", str(a_file)], "is a file", capsys)


def test_overwrite_clears_the_old_artifact_before_the_new_one(tmp_path, monkeypatch):
    from kvcompress.calibration import cli

    existing = tmp_path / "artifact"
    existing.mkdir()
    (existing / "compressor_config.json").write_text("{}")
    (existing / "stale.json").write_text("{}")
    monkeypatch.setattr(cli, "_calibrate_gates", lambda args: None)  # stop after the checks
    main(["calibrate", "--method", "gate", "--output", str(existing), "--overwrite"])
    assert not existing.exists()


def test_errors_are_one_line_unless_debug(tmp_path, capsys):
    missing = str(tmp_path / "no-such-compressor")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--compressor", missing])
    assert str(exit_.value.code).startswith("error: ") and "--debug" in str(exit_.value.code)
    with pytest.raises(Exception) as raised:
        main(["--debug", "generate", "--compressor", missing])
    assert not isinstance(raised.value, SystemExit)
