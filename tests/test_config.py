"""Config loading: every kind of error names file, key and problem; values parse; the
example files load; `config check` prints a config that loads back to the same thing."""

from __future__ import annotations

import re

from pathlib import Path

import pytest

import conf
from conf.values import ListenAddress, format_duration, format_size, parse_duration, parse_listen, parse_size

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "text, size",
    [(0, 0), (1048576, 1048576), ("512K", 512 * 1024), ("25M", 25 * 1024**2), ("1G", 1024**3),
     ("25m", 25 * 1024**2), ("2MB", 2 * 1024**2), ("3MiB", 3 * 1024**2), (" 7 ", 7)],
)
def test_sizes(text, size):
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["", "M", "1.5M", "-1", -1, "25X", True, [1], "1 000"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "text, seconds",
    [(30, 30), (0.5, 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("5d", 432000), ("1h30m", 5400), ("250ms", 0.25)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "5 m", "-5s", -1, False, "5s5"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, host, port",
    [("127.0.0.1:25", "127.0.0.1", 25), ("0.0.0.0:587", "0.0.0.0", 587), ("[::1]:25", "::1", 25),
     ("[::]:993", "::", 993), ("[2001:DB8::1]:2525", "2001:db8::1", 2525)],
)
def test_listen_addresses(text, host, port):
    address = parse_listen(text)
    assert address == ListenAddress(host, port)
    assert parse_listen(str(address)) == address


@pytest.mark.parametrize(
    "text, problem",
    [("127.0.0.1", "host:port"), ("localhost:25", "not an IP address"),
     ("::1:25", "write IPv6 addresses in brackets"),
     ("1.2.3:25", "not an IP address"), ("127.0.0.1:0", "out of range"), ("127.0.0.1:65536", "out of range"),
     ("127.0.0.1:x", "not a number"), ("[::1]25", "[IPv6]:port"),
     ("[127.0.0.1]:25", "only IPv6 addresses go in brackets"), (":25", "host:port")],
)
def test_bad_listen_addresses(text, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_listen(text)


def test_defaults_are_for_production():
    config = conf.loads('[server]\nhostname = "mx.example.org"\n')
    assert config.smtp.listen == (ListenAddress("0.0.0.0", 25), ListenAddress("::", 25))
    assert config.imap.listen_tls[0].port == 993
    assert config.smtp.max_message_size == 25 * 1024**2
    assert config.storage.shards == 16
    assert config.accounts.recipient_delimiter == "+"
    assert config.server.data_dir == Path("/var/lib/postroom")


def test_dev_config_matches_design_ports():
    config = conf.load(REPO / "conf/dev.toml")
    ports = {
        "smtp": config.smtp.listen, "submission": config.submission.listen,
        "submissions": config.submission.listen_tls, "imap": config.imap.listen,
        "imaps": config.imap.listen_tls, "pop3": config.pop3.listen, "pop3s": config.pop3.listen_tls,
    }
    expected = {"smtp": 2525, "submission": 2587, "submissions": 2465, "imap": 2143,
                "imaps": 2993, "pop3": 2110, "pop3s": 2995}
    assert {name: [(a.host, a.port) for a in addrs] for name, addrs in ports.items()} == {
        name: [("127.0.0.1", port)] for name, port in expected.items()
    }
    assert config.tls.self_signed is True
    assert config.server.data_dir == Path.cwd() / "var"


def test_production_example_documents_every_key():
    """Every key of every section is set (so documented) in its section of the example."""
    import tomllib

    text = (REPO / "conf/postroom.toml").read_text()
    config = conf.loads(text)
    assert [a.port for a in config.submission.listen] == [587, 587]
    assert config.tls.self_signed is False
    example = tomllib.loads(text)
    section = None
    for line in conf.dump(config).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line or line.startswith("# ") and line.endswith(" is not set"):
            key = line.split(" = ")[0] if " = " in line else line.split()[1]
            # A key with no default may be documented as a commented-out example instead.
            commented = " = " not in line and re.search(rf"^# {key} = ", text, re.MULTILINE)
            assert key in example.get(section, {}) or commented, \
                f"conf/postroom.toml: [{section}] does not document {key}"


def test_dump_loads_back_to_the_same_config():
    original = conf.loads(
        '[server]\nhostname = "mx.example.org"\ndata_dir = "/srv/mail \\"quoted\\" \\\\ dir"\n'
        '[smtp]\nlisten = ["[::1]:2525", "127.0.0.1:2525"]\nmax_message_size = 1000\n'
        '[dns]\nnameservers = ["9.9.9.9", "2620:fe::fe"]\ntimeout = "1m30s"\n'
        '[accounts]\nrecipient_delimiter = ""\n'
    )
    again = conf.loads(conf.dump(original))
    assert again == original
    assert again.dns.timeout == 90
    odd = conf.loads('[server]\nhostname = "mx.example.org"\n[dns]\ntimeout = 0.0001\n')
    assert conf.loads(conf.dump(odd)).dns.timeout == 0.0001


def test_single_listen_string_is_a_list_of_one():
    config = conf.loads('[server]\nhostname = "mx.example.org"\n[imap]\nlisten = "127.0.0.1:143"')
    assert config.imap.listen == (ListenAddress("127.0.0.1", 143),)


def test_empty_listen_list_turns_a_listener_off():
    assert conf.loads('[server]\nhostname = "mx.example.org"\n[pop3]\nlisten = []').pop3.listen == ()


FQDN = '[server]\nhostname = "mx.example.org"\n'

# Each kind of error, as the sysadmin sees it: `config check` exits 1 with one line that
# names the file, the key and the problem, and no traceback.
BAD_CONFIGS = [
    ("[smtp]\nlissen = []\n", "smtp.lissen: unknown key", "did you mean 'listen'"),
    ("[smpt]\n", "smpt: unknown section", "did you mean 'smtp'"),
    ("[smtp]\nmax_recipients = \"ten\"\n", "smtp.max_recipients: expected an integer", "string 'ten'"),
    ("[tls]\nself_signed = \"yes\"\n", "tls.self_signed: expected true or false", ""),
    ("[smtp]\nmax_message_size = \"big\"\n", "smtp.max_message_size: expected a size", "'big'"),
    ("[dns]\ntimeout = \"soon\"\n", "dns.timeout: expected a duration", "'soon'"),
    ("[imap]\nlisten = [\"mail.example.org:143\"]\n", "imap.listen: item 1: bad address", "not an IP address"),
    ("[pop3]\nlisten_tls = [\"127.0.0.1:99999\"]\n", "pop3.listen_tls: item 1: bad address", "out of range 1-65535"),
    ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients: 0 out of range", "1-100000"),
    ("[pop3]\nexpire = 7\n", "pop3.expire: expected one of", "'never'"),
    ("[storage]\nshards = 5000\n", "storage.shards: 5000 out of range", ""),
    ("[server]\nlog_level = \"loud\"\n", "server.log_level: expected one of", "'debug'"),
    ("[server]\nhostname = \"mail example\"\n", "server.hostname: not a valid host name", ""),
    ("[server]\nlisten_backlog = 0\n", "server.listen_backlog: 0 out of range", "1-65535"),
    ("[dns]\nnameservers = [\"dns.google\"]\n", "dns.nameservers: item 1: not an IP address", ""),
    ("[accounts]\nrecipient_delimiter = \"ab\"\n", "accounts.recipient_delimiter: expected one of", "'ab'"),
    ("[accounts]\npassword_memory = \"4K\"\n", "accounts.password_memory: 4096 out of range", ""),
    (f"{FQDN}[accounts]\npassword_memory = \"16K\"\npassword_lanes = 4\n",
     "accounts.password_memory: at least 8K per lane", "4 lanes need 32K"),
    ("server = 1\n", "server: expected a [server] section", ""),
    ("[smtp\n", "invalid TOML", "line 1"),
    ("[smtp]\nmax_recipients = 5\nmax_recipients = 6\n", "smtp.max_recipients: invalid TOML", "line 3"),
    ("[dns]\ntimeout = inf\n", "dns.timeout: expected a duration of zero or more seconds", "inf"),
    ("[dns]\ntimeout = nan\n", "dns.timeout: expected a duration of zero or more seconds", "nan"),
    ('[server]\ndata_dir = "/srv/a\\u0000b"\n', "server.data_dir: path contains control characters", ""),
    ('[smtp]\nlisten = ["127.0.0.1:\uff12\uff15"]\n', "smtp.listen: item 1: bad address", "is not a number"),
    ('[accounts]\nrecipient_delimiter = "\\n"\n', "accounts.recipient_delimiter: expected one of", ""),
    ('[server]\nhostname = "vm"\n', "server.hostname: 'vm' is not a fully qualified name", "MX record"),
    (f'{FQDN}[tls]\ncert = "/etc/c.pem"\nself_signed = true\n', "tls.self_signed: needs both cert and key", ""),
    (f'{FQDN}[tls]\nkey = "/etc/k.pem"\n', "tls.cert: not set, but key is", ""),
]


@pytest.mark.parametrize("text, message, detail", BAD_CONFIGS)
def test_each_bad_config_is_one_clear_line(tmp_path, cli, text, message, detail):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = cli("config", "check", config=path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"postroom: {path}: ")
    assert message in lines[0] and detail in lines[0]


def test_missing_config_file(tmp_path, cli):
    result = cli("config", "check", config=tmp_path / "absent.toml")
    assert result.returncode == 1
    absent = tmp_path / "absent.toml"
    assert result.stderr == f"postroom: {absent}: cannot read config file: No such file or directory\n"


def test_missing_certificate_is_refused(tmp_path, write_config, cli):
    path = write_config(tls={"cert": str(tmp_path / "no.pem"), "key": str(tmp_path / "no.key"), "self_signed": False})
    result = cli("config", "check", config=path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"postroom: {tmp_path / 'no.pem'}: file not found (set by tls.cert)"


def test_config_check_prints_the_effective_config(tmp_path, cli):
    result = cli("config", "check", config=REPO / "conf/dev.toml")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stderr
    assert 'listen = ["127.0.0.1:2525"]' in result.stdout
    assert f'data_dir = "{tmp_path / "var"}"' in result.stdout  # relative paths: from the working dir
    dev_here = (REPO / "conf/dev.toml").read_text().replace("./var", str(tmp_path / "var"))
    assert conf.loads(result.stdout) == conf.loads(dev_here)


def test_a_greylist_delay_no_retry_could_pass_is_refused():
    with pytest.raises(conf.ConfigError, match="retry_window"):
        conf.loads('[server]\nhostname = "mx.example.org"\n'
                   '[greylist]\nenabled = true\ndelay = "1d"\nretry_window = "1h"\n')
