# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""The same hypervisor calls through the plugin and through Ganeti 3.1's own
KVMHypervisor, one run, same QEMU, same instances: start (and, as the
baseline, bare QEMU of the same command line), info, all-info of 10 (paused
instances), force stop and live migration of guest-less KVM instances; ACPI
stop of the booted test guest (TCG). Calls are made as Ganeti makes them: one driver
object per call (noded makes one per request); a migration is Ganeti's
master's sequence (MigrationInfo, AcceptInstance, MigrateInstance, then
GetMigrationStatus every second until it is over, both Finalize calls); an
ACPI stop is StopInstance then GetInstanceInfo every 50 ms until the
instance is gone. Run by `integrations/ganeti/run-tests --bench`.
"""

import gc
import json
import os
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import gkvm_ganeti.activate  # noqa: F401
from ganeti import constants, errors, objects, pathutils

from gkvm_ganeti.hypervisor import Gkvm, GkvmHypervisor
from tests.support import (READY, Serial, ganeti_driver, guest_hvparams,
                           wait_pid_gone)

ROUNDS = 10


#: Ganeti's master sleeps this long between migration status polls
#: (cmdlib/instance_migration.py, _MIGRATION_POLL_INTERVAL).
MIGRATION_POLL_INTERVAL = 1.0


def instance(name, guest=False, migration_port=None):
  hvp = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
  hvp.update({constants.HV_KERNEL_PATH: "", constants.HV_INITRD_PATH: "",
              constants.HV_VNC_BIND_ADDRESS: "", constants.HV_VHOST_NET: False,
              constants.HV_SERIAL_CONSOLE: True,
              constants.HV_KVM_PATH: shutil.which("qemu-system-x86_64"),
              constants.HV_KVM_FLAG: constants.HT_KVM_ENABLED,
              # Both drivers at the same speed, not Ganeti's 32 MiB/s.
              constants.HV_MIGRATION_BANDWIDTH: 10240})
  if migration_port:
    hvp[constants.HV_MIGRATION_PORT] = migration_port
  if guest:
    hvp.update(guest_hvparams())
  mem = 128 if guest else 64
  be = {constants.BE_MAXMEM: mem, constants.BE_MINMEM: mem,
        constants.BE_VCPUS: 1, constants.BE_AUTO_BALANCE: True,
        constants.BE_ALWAYS_FAILOVER: False, constants.BE_SPINDLE_USE: 1}
  import uuid
  return objects.Instance(name=name, primary_node="n1",
                          uuid=str(uuid.uuid4()), os="noop",
                          hypervisor=constants.HT_KVM, hvparams=hvp,
                          beparams=be, nics=[], disks=[], disks_info=[],
                          admin_state=constants.ADMINST_UP,
                          network_port=None, tags=set())


def plugin_on(tmp, node):
  """A node's driver objects (one per call): the plugin on its run dir."""
  def make():
    hv = GkvmHypervisor()
    hv.gkvm = Gkvm(run_dir=os.path.join(tmp, "gkvm-" + node))
    return hv
  return make


def ganeti_on(tmp, node):
  """A node's driver objects (one per call): Ganeti's own on its run dir."""
  return ganeti_driver(os.path.join(tmp, "ganeti-" + node))


def migrate(src, dst, inst):
  """Ganeti's master's migration, step by step (a new driver object per
  call, as each is a request to a node daemon)."""
  info = src().MigrationInfo(inst)
  if hasattr(src, "_ROOT_DIR"):
    # Ganeti's own runtime carries the source's QEMU command line, paths
    # included, as on nodes that share one layout: here the two nodes'
    # run directories differ, so the destination gets its own paths.
    info = info.replace(src._ROOT_DIR, dst._ROOT_DIR)
  dst().AcceptInstance(inst, info, "127.0.0.1")
  src().MigrateInstance("cluster", inst, "127.0.0.1", True)
  while True:
    status = src().GetMigrationStatus(inst)
    if status.status not in constants.HV_KVM_MIGRATION_ACTIVE_STATUSES:
      break
    time.sleep(MIGRATION_POLL_INTERVAL)
  if status.status != constants.HV_MIGRATION_COMPLETED:
    raise AssertionError("migration ended %s" % status.status)
  src().FinalizeMigrationSource(inst, True, True)
  dst().FinalizeMigrationDst(inst, info, True)


def acpi_stop(make, inst, within=30):
  """StopInstance, then GetInstanceInfo every 50 ms until the instance is
  gone; False if it was still there after `within` s (a press the guest
  did not act on)."""
  make().StopInstance(inst)
  deadline = time.time() + within
  while True:
    try:
      if make().GetInstanceInfo(inst.name) is None:
        return True
    except (OSError, errors.HypervisorError):
      # Ganeti's own driver, asking a QEMU that is exiting: its QMP
      # connection breaks (BrokenPipeError); ask again.
      pass
    if time.time() > deadline:
      return False
    time.sleep(0.05)


def qemu_argv(run_dir, name):
  """The command line of the QEMU gkvm runs for `name`, without gkvm's
  event pipe (a FIFO gkvm prepares and reads)."""
  with open(os.path.join(run_dir, "pid", name)) as f:
    pid = int(f.read())
  with open("/proc/%d/cmdline" % pid, "rb") as f:
    argv = [a.decode() for a in f.read().split(b"\0")[:-1]]
  out = []
  i = 0
  while i < len(argv):
    if argv[i] in ("-chardev", "-mon") and "gkvm-events" in argv[i + 1]:
      i += 2
      continue
    out.append(argv[i])
    i += 1
  return out


def bare_start(argv, run_dir, name):
  """Bare QEMU of gkvm's argv: run it (it daemonizes once ready, stopped
  with -S), then `cont` over QMP; returns the seconds taken, and leaves
  nothing behind."""
  t = time.perf_counter()
  subprocess.run(argv, check=True, stderr=subprocess.DEVNULL)
  qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  qmp.connect(os.path.join(run_dir, "ctrl", name + ".qmp"))
  f = qmp.makefile("rwb")
  f.readline()
  for cmd in ("qmp_capabilities", "cont"):
    f.write(json.dumps({"execute": cmd}).encode() + b"\n")
    f.flush()
    while b'"return"' not in f.readline():
      pass
  took = time.perf_counter() - t
  f.close()
  qmp.close()
  pid_file = os.path.join(run_dir, "pid", name)
  with open(pid_file) as pf:
    pid = int(pf.read())
  os.kill(pid, 9)
  wait_pid_gone(pid)
  for path in (pid_file, os.path.join(run_dir, "ctrl", name + ".qmp"),
               os.path.join(run_dir, "ctrl", name + ".qmp-watch"),
               os.path.join(run_dir, "ctrl", name + ".serial")):
    if os.path.lexists(path):
      os.unlink(path)
  return took


def timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def median_ms(xs):
  return statistics.median(xs) * 1000 if xs else float("nan")


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
  lost = {}
  try:
    run_dir = os.environ["GKVM_RUN_DIR"]
    for rnd in range(ROUNDS):
      for kind, make in drivers.items():
        inst = instance("b%s%d" % (kind[0], rnd))
        # One driver object per call, as Ganeti's node daemon makes them.
        rows.setdefault((kind, "start"), []).append(
          timed(lambda: make().StartInstance(inst, [], False)))
        if kind == "plugin":
          argv = qemu_argv(run_dir, inst.name)
        gc.collect()
        rows.setdefault((kind, "force stop"), []).append(
          timed(lambda: (make().StopInstance(inst, force=True),
                         make().CleanupInstance(inst.name))))
        gc.collect()
        if kind == "plugin":
          # The baseline: the same QEMU command line, run by hand.
          rows.setdefault(("bare", "start"), []).append(
            bare_start(argv, run_dir, inst.name))
          gc.collect()
    # Info, and all-info of 10 instances each, the two drivers' calls
    # interleaved so that the host's drift hits both alike. Started paused:
    # guest-less firmware spins (about 18 % of a core each under this
    # machine's nested KVM), and twenty of them on two cores would time the
    # host's contention rather than the calls.
    insts = {}
    for kind, make in drivers.items():
      insts[kind] = [instance("a%s%d" % (kind[0], i)) for i in range(10)]
      for i in insts[kind]:
        make().StartInstance(i, [], True)
        gc.collect()
    for _ in range(10):
      for n in range(10):
        for kind, make in drivers.items():
          name = insts[kind][n].name
          rows.setdefault((kind, "info"), []).append(
            timed(lambda: make().GetInstanceInfo(name)))
          gc.collect()
    for _ in range(ROUNDS):
      for kind, make in drivers.items():
        rows.setdefault((kind, "all-info of 10"), []).append(
          timed(lambda: make().GetAllInstancesInfo()))
        gc.collect()
    for kind, make in drivers.items():
      for i in insts[kind]:
        make().StopInstance(i, force=True)
        make().CleanupInstance(i.name)
        gc.collect()
    # Live migration, there and back, between two run directories
    # (nodes) on this machine.
    for kind, on in (("plugin", plugin_on), ("ganeti", ganeti_on)):
      nodes = [on(tmp, "a"), on(tmp, "b")]
      inst = instance("m" + kind[0], migration_port=44000 + os.getpid() % 1000)
      nodes[0]().StartInstance(inst, [], False)
      for hop in range(2 * 3):
        src, dst = nodes[hop % 2], nodes[(hop + 1) % 2]
        rows.setdefault((kind, "live migration"), []).append(
          timed(lambda: migrate(src, dst, inst)))
        gc.collect()
      nodes[0]().StopInstance(inst, force=True)
      nodes[0]().CleanupInstance(inst.name)
    # ACPI stop of the booted guest.
    for rnd in range(5):
      for kind, make in drivers.items():
        inst = instance("g%s%d" % (kind[0], rnd), guest=True)
        make().StartInstance(inst, [], False)
        root = (os.environ["GKVM_RUN_DIR"] if kind == "plugin"
                else os.path.join(tmp, "ganeti"))
        serial = Serial(os.path.join(root, "ctrl", inst.name + ".serial"))
        serial.wait_for(READY)
        t = time.perf_counter()
        if acpi_stop(make, inst):
          rows.setdefault((kind, "ACPI stop"), []).append(
            time.perf_counter() - t)
        else:
          lost[kind] = lost.get(kind, 0) + 1
          serial.sock.settimeout(1)
          try:
            said = serial.buf + serial.sock.recv(65536)
          except OSError:
            said = serial.buf
          print("%s: %s did not stop within 30 s of its ACPI power button;"
                " its console said: %r" % (kind, inst.name, said[-500:]),
                file=sys.stderr)
          make().StopInstance(inst, force=True)
        serial.close()
        make().CleanupInstance(inst.name)
        gc.collect()
  finally:
    subprocess.run(["pkill", "-9", "-f", tmp], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
  print("Ganeti 3.1 hypervisor calls, guest-less KVM instances (64 MiB) but"
        " for the ACPI stop (booted TCG guest), medians")
  bare = median_ms(rows[("bare", "start")])
  print("bare QEMU start (gkvm's command line, run by hand, to QMP cont):"
        " %.1f ms; plugin %.2fx, Ganeti's own %.2fx of it"
        % (bare, median_ms(rows[("plugin", "start")]) / bare,
           median_ms(rows[("ganeti", "start")]) / bare))
  print("%-16s %12s %12s %8s %8s" % ("call", "plugin", "Ganeti's own", "ratio",
                                   "samples"))
  for op in ("start", "info", "all-info of 10", "force stop", "ACPI stop",
             "live migration"):
    p, g = median_ms(rows[("plugin", op)]), median_ms(rows[("ganeti", op)])
    print("%-16s %9.1f ms %9.1f ms %7.2fx %8d" % (op, p, g, p / g if g else 0,
                                                len(rows[("plugin", op)])))
  for kind, n in sorted(lost.items()):
    print("%s: %d ACPI stop(s) left out: the guest did not power off within"
          " 30 s" % (kind, n))


if __name__ == "__main__":
  sys.exit(main())
