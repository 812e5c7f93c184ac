"""Fixtures and plugins for every test directory."""

import os

pytest_plugins = ["tests.root_skips"]

# The IPVS suite needs the QEMU VM's kernel; tests/integration/test_ipvs_vm.py boots it and runs
# the suite in there (UPROXY_IN_VM=1). On the host it is not even collected.
collect_ignore = [] if os.environ.get("UPROXY_IN_VM") == "1" else ["vm_ipvs"]
