"""The CLI's error contract, run as a user runs it: one line on stderr, exit 2 for
usage and 1 otherwise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

XLAT = [sys.executable, "-m", "xlat.cli"]


def xlat(*args: str, control: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XLAT, "--control", str(control), *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ("session", "add", "--peer-a", "2001:db8::1:5", "--peer-b", "192.0.2.1:4"),
        ("session", "add", "--peer-a", "192.0.2.1:4"),
        ("session", "add", "--peer-a", "192.0.2.1:4", "--peer-b", "192.0.2.2:4", "--timeout",
         "-1"),
        ("frobnicate",),
        ("session", "show"),
        ("session", "del", "abc", "--call-id", "c1@x"),
        ("monitor", "--interval", "0"),
        ("run", "--datapath", "dpdk"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    r = xlat(*args, control=tmp_path / "none.sock")
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("xlat: error: ")


@pytest.mark.parametrize("args", [("session", "list", "-j"), ("stats",), ("flow", "list"),
                                  ("stop",), ("session", "show", "--call-id", "c1@x"),
                                  ("monitor",), ("monitor", "-j")])
def test_no_daemon_exits_1_with_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    r = xlat(*args, control=tmp_path / "none.sock")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"xlat: cannot reach xlat at {tmp_path / 'none.sock'}: No such file or directory"]


def test_run_rejects_bad_config_in_one_line(tmp_path: Path) -> None:
    r = xlat("run", "--media-v4", "2001:db8::1", control=tmp_path / "c.sock")
    assert r.returncode == 1
    assert r.stderr.strip() == "xlat: --media-v4: 2001:db8::1 is not an IPv4 address"


BAD_FILE = 'media-v4 = "192.0.2.1"\nidle_timeout = "thirty"\ntimout = 3\nbpffs = {a = 1}\n'


def test_config_check_prints_one_line_per_problem(tmp_path: Path) -> None:
    f = tmp_path / "xlat.toml"
    f.write_text(BAD_FILE)
    r = xlat("config", "check", "-c", str(f), control=tmp_path / "c.sock")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"xlat: {f}: idle_timeout: expects a number of seconds, got a string ('thirty')",
        f"xlat: {f}: timout: unknown key, did you mean 'timeout'?",
        f"xlat: {f}: bpffs: expects a string, got a table ({{'a': 1}})",
    ]
    j = xlat("config", "check", "-c", str(f), "-j", control=tmp_path / "c.sock")
    assert j.returncode == 1
    assert json.loads(j.stdout)["problems"][1] == {
        "source": str(f), "key": "timout", "reason": "unknown key, did you mean 'timeout'?"}


def test_run_refuses_a_bad_file_the_same_way(tmp_path: Path) -> None:
    f = tmp_path / "xlat.toml"
    f.write_text(BAD_FILE)
    check = xlat("config", "check", "-c", str(f), control=tmp_path / "c.sock")
    r = xlat("run", "-c", str(f), control=tmp_path / "c.sock")
    assert r.returncode == 1 and r.stderr == check.stderr
    assert "Traceback" not in r.stderr


def test_config_check_ok(tmp_path: Path) -> None:
    f = tmp_path / "xlat.toml"
    f.write_text('media-v4 = "192.0.2.1"\ntimeout = 30\nsip_rate = 400\n')
    r = xlat("config", "check", "-c", str(f), control=tmp_path / "c.sock")
    assert (r.returncode, r.stdout) == (0, "ok\n")
    assert r.stderr == f"xlat: warning: {f}: sip_rate: deprecated spelling, write 'sip-rate'\n"


def test_config_check_of_the_shipped_file_asks_for_a_media_address(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "etc" / "xlat.toml"
    r = xlat("config", "check", "-c", str(example), control=tmp_path / "c.sock")
    assert r.returncode == 1
    assert r.stderr == f"xlat: {example}: media-v4: no media address: set media-v4 and/or " \
                       "media-v6 (or the options --media-v4/--media-v6)\n"


def test_user_hash_prints_a_users_file_line_the_daemon_accepts(tmp_path: Path) -> None:
    r = subprocess.run([*XLAT, "user", "hash", "alice", "--realm", "xlat.test"],
                       input="s3cret\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    from xlat.sip.auth import ha1, parse_users

    users = tmp_path / "users.toml"
    users.write_text(f'realm = "xlat.test"\n[users]\n{r.stdout}')
    creds = parse_users(users.read_bytes(), str(users))
    assert creds.users["alice"] == {a: ha1(a, "alice", "xlat.test", "s3cret")
                                    for a in ("SHA-256", "MD5")}
    bad = tmp_path / "bad.toml"
    bad.write_text('realm = "xlat.test"\n[users]\nbob = { MD5 = "xyz" }\n')
    for options, error in (
        (("--users", str(bad)), f"xlat: --users: {bad}: users.bob.MD5 must be 32 hex digits"),
        (("--users", str(users), "--registrar-upstream", "sip:192.0.2.9"),
         "xlat: --registrar-upstream: a local registrar (users) or an upstream one, not both"),
        (("--registrar-upstream", "sip:pbx.example"),
         "xlat: --registrar-upstream: 'sip:pbx.example': the host must be an IP literal"),
    ):
        r = xlat("run", "--media-v4", "192.0.2.1", *options, control=tmp_path / "c.sock")
        assert r.returncode == 1 and r.stderr.strip() == error


@pytest.mark.parametrize("words, offered", [
    ("xlat mon", {"monitor"}),
    ("xlat session show --", {"--call-id", "--json"}),
    ("xlat session del --", {"--call-id"}),
    ("xlat monitor --", {"--interval", "--count", "--max-calls", "--json"}),
])
def test_bash_completion_offers_monitor_and_call_id(words: str, offered: set[str]) -> None:
    """The package's completion script is click's, which asks the installed ``xlat``
    itself (``_XLAT_COMPLETE=bash_complete``): what it answers is what bash offers."""
    xlat_bin = Path(sys.executable).parent / "xlat"
    r = subprocess.run([str(xlat_bin)], capture_output=True, text=True, timeout=60,
                       env={"_XLAT_COMPLETE": "bash_complete", "COMP_WORDS": words,
                            "COMP_CWORD": str(len(words.split()) - 1), "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert offered <= {line.partition(",")[2] for line in r.stdout.splitlines()}
