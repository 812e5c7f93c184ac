"""Flags of the iptables mode: --mode/--proxy-mode iptables, --cluster-cidr, --masquerade-all."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from uproxy.cli import cli
from uproxy.errors import SettingsError
from uproxy.settings import Settings


def test_settings_take_the_iptables_mode_and_an_ipv4_cluster_cidr() -> None:
    settings = Settings(mode="iptables", cluster_cidr="10.244.0.0/16", masquerade_all=True)
    assert (settings.mode, settings.cluster_cidr, settings.masquerade_all) == (
        "iptables",
        "10.244.0.0/16",
        True,
    )


def test_the_cluster_cidr_is_one_per_family_as_kube_proxys() -> None:
    dual = Settings(cluster_cidr="10.244.0.0/16, fd00:10:244::1/56")
    assert (dual.cluster_cidr_of(4), dual.cluster_cidr_of(6)) == (
        "10.244.0.0/16",
        "fd00:10:244::/56",
    )
    v6 = Settings(cluster_cidr="fd00:10:244::/56")
    assert (v6.cluster_cidr_of(4), v6.cluster_cidr_of(6)) == (None, "fd00:10:244::/56")
    assert Settings().cluster_cidr_of(4) is None


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.244.0.0/33", "'10.244.0.0/33' is not a CIDR"),
        ("10.244.0.0/16,", "'' is not a CIDR"),
        ("10.244.0.0/16,10.245.0.0/16", "at most one CIDR per IP family"),
        ("fd00::/64,fd01::/64", "at most one CIDR per IP family"),
    ],
)
def test_a_bad_cluster_cidr_is_refused_naming_the_flag(cidr: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"--cluster-cidr: .*{message}"):
        Settings(cluster_cidr=cidr)


def test_the_cli_offers_the_mode_under_both_names_with_help() -> None:
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "iptables" in help_text and "--cluster-cidr" in help_text
    assert "--masquerade-all" in help_text and "--proxy-mode" in help_text
    bad = CliRunner().invoke(cli, ["run", "--proxy-mode", "iptables", "--cluster-cidr", "nope"])
    assert bad.exit_code == 2 and "--cluster-cidr" in bad.output
