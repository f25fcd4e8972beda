"""What a new user meets first: the banner's address, settings refused at start, --help."""

import pytest

from edge.local import banner, banner_hosts
from edge.settings import EdgeSettings
from runtime.settings import load_settings, nats_url_problem


def test_banner_prints_a_specific_listen_address_as_it_is():
    assert banner_hosts("192.168.1.20", ["10.0.0.5"]) == ["192.168.1.20"]
    assert banner_hosts("127.0.0.1", ["10.0.0.5"]) == ["127.0.0.1"]


def test_banner_for_a_wildcard_lists_interface_addresses_a_phone_can_reach():
    # The hostname resolving to 127.0.0.1 (as on many machines) must not win.
    found = ["127.0.0.1", "169.254.3.4", "81.2.69.160", "192.168.1.20", "100.101.102.103", "10.0.0.5", "192.168.1.20"]
    assert banner_hosts("0.0.0.0", found) == ["192.168.1.20", "10.0.0.5", "100.101.102.103", "81.2.69.160"]
    assert banner_hosts("::", ["fe80::1", "not an address", "192.168.1.20"]) == ["192.168.1.20"]


def test_banner_falls_back_to_loopback_and_says_so_when_no_interface_has_an_address():
    assert banner_hosts("0.0.0.0", ["127.0.0.1", "127.0.1.1"]) == ["127.0.0.1"]
    text = banner(EdgeSettings(host="0.0.0.0"), 8080, ["127.0.0.1"])
    assert "No network address found" in text


def test_banner_with_accounts_shows_admin_commands_that_work_as_written():
    text = banner(EdgeSettings(host="0.0.0.0", auth="required"), 8080, ["192.168.1.20", "10.0.0.5"])
    assert "RELAY_SERVER_URL=ws://192.168.1.20:8080" in text and "ws://10.0.0.5:8080" in text
    assert ".venv/bin/relay-admin users add alice" in text and "--nats-url" not in text
    assert "exists already" in text  # what to do when alice was made on an earlier run


@pytest.mark.parametrize(
    "url",
    ["not-a-url", "http://127.0.0.1:4222", "nats://:4222", "nats://h:70000", "nats://h:x", "nats://a:4222,bogus", "", "nats://h:0"],
)
def test_a_nats_url_that_cannot_work_is_refused_at_start(url):
    assert nats_url_problem(url)


@pytest.mark.parametrize("url", ["nats://127.0.0.1:4222", "nats://u:p@n1:4222, tls://n2", "ws://h:8080", "nats://n1"])
def test_usable_nats_urls_pass(url):
    assert nats_url_problem(url) is None


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--port", "70000"], "0 to 65535"),
        (["--port", "-1"], "0 to 65535"),
        (["--nats-url", "not-a-url"], "not-a-url"),
        (["--kv-replicas", "0"], "kv_replicas"),
        (["--uvloop", "maybe"], "true|false"),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_the_flag_and_variable(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        load_settings(EdgeSettings, argv, {}, prog="relay-edge")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("relay-edge: error: ") and says in err
    if "--uvloop" not in argv:
        assert "RELAY_" in err


def test_help_shows_every_default_and_boolean_values(capsys):
    with pytest.raises(SystemExit):
        load_settings(EdgeSettings, ["--help"], {}, prog="relay-edge")
    shown = " ".join(capsys.readouterr().out.split())
    assert "[default: 8080; env RELAY_PORT]" in shown
    assert "--uvloop true|false" in shown and "[default: true; env RELAY_UVLOOP]" in shown
    assert "--auth required|none" in shown
