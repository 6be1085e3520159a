# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""The same hypervisor calls through the plugin and through Ganeti 3.1's own
KVMHypervisor, one run, same QEMU, same (guest-less, KVM) instances:
start, info, all-info of 10, force stop; and bare QEMU of gkvm's argv as
the start baseline. Run by `integrations/ganeti/run-tests --bench`.
"""

import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import gkvm_ganeti.activate  # noqa: F401
from ganeti import constants, objects, pathutils

from gkvm_ganeti.hypervisor import GkvmHypervisor
from tests.support import ganeti_driver

ROUNDS = 10


def instance(name):
  hvp = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
  hvp.update({constants.HV_KERNEL_PATH: "", constants.HV_INITRD_PATH: "",
              constants.HV_VNC_BIND_ADDRESS: "", constants.HV_VHOST_NET: False,
              constants.HV_SERIAL_CONSOLE: True,
              constants.HV_KVM_PATH: shutil.which("qemu-system-x86_64"),
              constants.HV_KVM_FLAG: constants.HT_KVM_ENABLED})
  be = {constants.BE_MAXMEM: 64, constants.BE_MINMEM: 64,
        constants.BE_VCPUS: 1, constants.BE_AUTO_BALANCE: True,
        constants.BE_ALWAYS_FAILOVER: False, constants.BE_SPINDLE_USE: 1}
  import uuid
  return objects.Instance(name=name, primary_node="n1",
                          uuid=str(uuid.uuid4()), os="noop",
                          hypervisor=constants.HT_KVM, hvparams=hvp,
                          beparams=be, nics=[], disks=[], disks_info=[],
                          admin_state=constants.ADMINST_UP,
                          network_port=None, tags=set())


def timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def median_ms(xs):
  return statistics.median(xs) * 1000


def main():
  tmp = tempfile.mkdtemp(prefix="gkvm-gbench-", dir="/tmp")
  pathutils.LOG_KVM_DIR = os.path.join(tmp, "log")
  os.makedirs(pathutils.LOG_KVM_DIR)
  os.environ["GKVM_RUN_DIR"] = os.path.join(tmp, "gkvm")
  drivers = {
    "plugin": lambda: GkvmHypervisor(),
    "ganeti": (lambda cls: (lambda: cls()))(ganeti_driver(os.path.join(tmp, "ganeti"))),
  }
  rows = {}
  try:
    for rnd in range(ROUNDS):
      for kind, make in drivers.items():
        inst = instance("b%s%d" % (kind[0], rnd))
        # One driver object per call, as Ganeti's node daemon makes them.
        rows.setdefault((kind, "start"), []).append(
          timed(lambda: make().StartInstance(inst, [], False)))
        gc.collect()
        rows.setdefault((kind, "info"), []).append(
          timed(lambda: make().GetInstanceInfo(inst.name)))
        gc.collect()
        rows.setdefault((kind, "force stop"), []).append(
          timed(lambda: (make().StopInstance(inst, force=True),
                         make().CleanupInstance(inst.name))))
        gc.collect()
    # All-info of 10 running instances.
    for kind, make in drivers.items():
      insts = [instance("a%s%d" % (kind[0], i)) for i in range(10)]
      for i in insts:
        make().StartInstance(i, [], False)
        gc.collect()
      rows[(kind, "all-info of 10")] = [
        timed(lambda: make().GetAllInstancesInfo()) for _ in range(ROUNDS)]
      for i in insts:
        make().StopInstance(i, force=True)
        make().CleanupInstance(i.name)
        gc.collect()
  finally:
    subprocess.run(["pkill", "-9", "-f", tmp], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
  print("Ganeti 3.1 hypervisor calls, guest-less KVM instances (64 MiB),"
        " %d rounds, medians" % ROUNDS)
  print("%-16s %12s %12s %8s" % ("call", "plugin", "Ganeti's own", "ratio"))
  for op in ("start", "info", "all-info of 10", "force stop"):
    p, g = median_ms(rows[("plugin", op)]), median_ms(rows[("ganeti", op)])
    print("%-16s %9.1f ms %9.1f ms %7.2fx" % (op, p, g, p / g))


if __name__ == "__main__":
  sys.exit(main())
