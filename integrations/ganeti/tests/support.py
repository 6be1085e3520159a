# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""What the plugin's tests and its benchmark share."""

import os

from ganeti.hypervisor import hv_kvm


def ganeti_driver(root):
  """Ganeti 3.1's own KVMHypervisor, keeping its run directory (Ganeti's
  layout) under `root` instead of /var/run/ganeti/kvm-hypervisor."""
  attrs = {"_ROOT_DIR": root}
  for attr, sub in (("_PIDS_DIR", "pid"), ("_UIDS_DIR", "uid"),
                    ("_CTRL_DIR", "ctrl"), ("_CONF_DIR", "conf"),
                    ("_NICS_DIR", "nic"), ("_CHROOT_DIR", "chroot"),
                    ("_CHROOT_QUARANTINE_DIR", "chroot-quarantine")):
    attrs[attr] = os.path.join(root, sub)
  attrs["_DIRS"] = [root] + [v for k, v in attrs.items() if k != "_ROOT_DIR"]
  return type("GanetiKVM", (hv_kvm.KVMHypervisor,), attrs)
