"""bmigrate's usage. replicate: one mode at a time, and an option the mode does not take
is refused in one line (exit 2), never ignored.

- --stop and --status take no target, protocol, policy or connection option.
- --config, --source and --control need --keep; the message says so.
- Two modes at once name the two, and nothing else (not --policy).
- --keep takes --log-level as run does, and hands it to the migration's settings.
- promote with a --receiver-state-dir that holds no record of NAME says so.
- track set-role handed-over refuses --new-generation (it goes with primary).
"""

from __future__ import annotations

import pytest

from bmig.cli.main import cli
from tests.unit.test_cli_common import run_cli


@pytest.mark.parametrize("argv,words", [
    (["--stop", "--ack-timeout", "5"], "--ack-timeout does not apply to --stop"),
    (["--status", "--protocol", "A"], "--protocol does not apply to --status"),
    (["--stop", "--to", "tcp://h:1/d"], "--to does not apply to --stop"),
    (["--status", "--secret-file", "s"], "--secret-file does not apply to --status"),
    (["--stop", "--policy", "block"], "--policy does not apply to --stop"),
    (["--config", "m.toml"], "--config needs --keep"),
    (["--to", "tcp://h:1/d", "--config", "m.toml"], "--config needs --keep"),
    (["--status", "--source", "/dev/x"], "--source needs --keep"),
    (["--to", "tcp://h:1/d", "--control", "c.sock"], "--control needs --keep"),
    (["--keep", "--stop"], "give --keep or --stop, not both"),
    (["--stop", "--status"], "give --stop or --status, not both"),
    (["--keep", "--to", "tcp://h:1/d", "--policy", "block"],
     "--keep replicates with --policy degrade"),
])
def test_an_option_the_mode_does_not_take_is_a_usage_error(monkeypatch, capsys, argv,
                                                            words):
    code, out, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "replicate", "vm1",
                             *argv, "--manage-dir", "/nonexistent")
    assert code == 2 and out == "", err
    line, = err.splitlines()
    assert words in line and line.endswith("(see bmigrate replicate --help)"), line
    if "--policy" not in argv:
        assert "--policy" not in line, line


def test_an_environment_variable_is_no_option_given(monkeypatch, capsys):
    """BMIG_CONTROL set for every command does not make --status refuse --control."""
    monkeypatch.setenv("BMIG_CONTROL", "/nonexistent/breqd.sock")
    code, _, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "replicate", "vm1",
                           "--status", "--manage-dir", "/nonexistent")
    assert code == 4 and "no bmig-nbd serves vm1" in err, err


def test_keep_takes_log_level_as_run_does(monkeypatch, capsys):
    import bmig.cli.ha
    seen = {}

    def keep(name, protocol, ack_timeout, manage_dir, config_file, as_json, flags):
        seen.update(flags)
        return 0
    monkeypatch.setattr(bmig.cli.ha, "keep", keep)
    code, _, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "replicate", "vm1",
                           "--keep", "--to", "tcp://h:1/vm1", "--log-level", "debug")
    assert code == 0, err
    assert seen["log_level"] == "debug"


def test_promote_with_a_wrong_receiver_state_dir_says_there_is_no_record(
        monkeypatch, capsys, tmp_path):
    target = tmp_path / "copy.img"
    target.write_bytes(bytes(4096))
    code, out, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "promote", "vm1",
                             "--target", str(target), "--receiver-state-dir",
                             str(tmp_path / "elsewhere"), "--no-fence")
    assert code == 3, err
    line, = err.splitlines()
    assert f"no record of vm1 in {tmp_path / 'elsewhere'}" in line, line
    assert not (tmp_path / "elsewhere").exists()


def test_set_role_handed_over_refuses_new_generation(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "track", "set-role",
                             "vm1", "handed-over", "--new-generation", "--control",
                             str(tmp_path / "none.sock"))
    assert code == 2 and out == "", err
    line, = err.splitlines()
    assert "--new-generation goes with primary only" in line, line
    assert line.endswith("(see bmigrate track set-role --help)"), line
