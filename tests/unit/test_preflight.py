from __future__ import annotations

import os
from pathlib import Path

import pytest

from uproxy.errors import UproxyError
from uproxy.instance_lock import InstanceLocked, default_lock_path, instance_lock
from uproxy.preflight import PrivilegeError, check_bind_address, has_net_admin, require_net_admin


def status(tmp_path: Path, cap_eff: str) -> Path:
    path = tmp_path / "status"
    path.write_text(f"Name:\tuproxy\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    return path


def test_net_admin_is_read_from_the_effective_capabilities(tmp_path: Path) -> None:
    assert has_net_admin(status(tmp_path, "000001ffffffffff"))
    assert has_net_admin(status(tmp_path, "0000000000001000"))
    assert not has_net_admin(status(tmp_path, "0000000000000000"))
    assert not has_net_admin(status(tmp_path, "0000000000002fff"))


def test_the_privilege_error_names_what_needs_it_and_what_happened(tmp_path: Path) -> None:
    with pytest.raises(PrivilegeError) as raised:
        require_net_admin("uproxy cleanup", "nothing was removed", status=status(tmp_path, "0"))
    assert str(raised.value) == (
        "uproxy cleanup: root or CAP_NET_ADMIN (containers: --cap-add NET_ADMIN --cap-add "
        f"NET_RAW) is needed, and this process (uid {os.geteuid()}) has neither; "
        "nothing was removed"
    )
    require_net_admin("portals", "", status=status(tmp_path, "1000"))


def test_bind_address_must_be_local() -> None:
    check_bind_address("0.0.0.0")
    check_bind_address("::")
    check_bind_address("127.0.0.1")
    with pytest.raises(UproxyError, match=r"192\.0\.2\.1 is not an address of this host"):
        check_bind_address("192.0.2.1")


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "uproxy.lock"
    with instance_lock(lock, refusal="stop it first"):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(InstanceLocked) as raised, instance_lock(lock, refusal="stop it first"):
            pass
        assert raised.value.pid == os.getpid()
        assert str(raised.value) == (
            f"another uproxy (pid {os.getpid()}) is running in this network namespace "
            f"(lock {lock}); stop it first"
        )
    assert not lock.exists()  # released: the next one starts
    with instance_lock(lock, refusal=""):
        pass


def test_an_unusable_lock_place_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with (
        pytest.raises(UproxyError, match=r"cannot open the instance lock .*--lock-file"),
        instance_lock(blocker / "uproxy.lock", refusal=""),
    ):
        pass


def test_the_default_lock_is_keyed_by_the_network_namespace() -> None:
    path = default_lock_path()
    assert path.parent == Path("/run/uproxy")
    assert path.name == f"netns-{os.stat('/proc/self/ns/net').st_ino}.lock"
