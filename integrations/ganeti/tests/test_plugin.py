# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""The plugin under Ganeti 3.1's own code: its hypervisor conformance
tests, and the hypervisor call sequence on this node through Ganeti's
objects, with a real QEMU and the booted test guest (TCG).

Run by `integrations/ganeti/run-tests` (GKVM_BIN, GKVM_GUEST_DIR,
GANETI_TESTSUITE set there).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import gkvm_ganeti.activate  # noqa: F401  (makes `kvm` the plugin's)
from ganeti import constants
from ganeti import errors
from ganeti import hypervisor
from ganeti import objects
from ganeti.hypervisor import hv_base

from gkvm_ganeti import hypervisor as plugin
from gkvm_ganeti.hypervisor import GkvmHypervisor
from tests import support


def hv_kvm_parameters():
  """Ganeti's own KVM parameters (its driver's table)."""
  from ganeti.hypervisor import hv_kvm
  return hv_kvm.KVMHypervisor.PARAMETERS

HERE = os.path.dirname(os.path.abspath(__file__))


def _sh(*argv):
  subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)


class TestConformance(unittest.TestCase):
  """Ganeti's tests that hold for any hypervisor class, with `kvm` the
  plugin's."""

  def test_ganeti_hypervisor_unittest(self):
    suite = os.environ["GANETI_TESTSUITE"]
    script = os.path.join(suite, "test", "py", "legacy",
                          "ganeti.hypervisor_unittest.py")
    code = ("import gkvm_ganeti.activate, runpy, sys;"
            "from ganeti import hypervisor, constants;"
            "assert hypervisor.GetHypervisorClass(constants.HT_KVM).__name__"
            " == 'GkvmHypervisor';"
            "sys.argv = [%r]; runpy.run_path(%r, run_name='__main__')"
            % (script, script))
    env = dict(os.environ, TOP_SRCDIR=suite)
    env["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(suite, "test", "py", "legacy"), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True)
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    self.assertIn("OK", proc.stderr)

  def test_gkvms_own_parameters_are_registered_with_ganeti(self):
    """gkvm's parameters beyond Ganeti's 65 are in Ganeti's tables once
    the plugin is active (what `gnt-*` and the daemons check -H against),
    with gkvm's own defaults; the plugin checks their values; and the list
    is gkvm's (its API schema's hypervisor parameters less Ganeti's)."""
    own = plugin.gkvm_params.GKVM_PARAMETERS
    for key, (kind, default, _) in own.items():
      self.assertEqual(constants.HVS_PARAMETER_TYPES[key], kind)
      self.assertIn(key, constants.HVS_PARAMETERS)
      self.assertEqual(constants.HVC_DEFAULTS[constants.HT_KVM][key], default)
    schema = json.loads(subprocess.run(
      [os.environ["GKVM_BIN"], "api", "--schema"], check=True,
      capture_output=True, text=True).stdout)
    props = schema["$defs"]["HvParams"]["properties"]
    ganetis = set(hv_kvm_parameters())
    self.assertEqual(sorted(set(props) - ganetis), sorted(own))
    for key, (_, default, allowed) in own.items():
      self.assertEqual(props[key]["default"], default, key)
      if allowed:
        values = schema["$defs"][props[key]["$ref"].rsplit("/", 1)[-1]]
        self.assertEqual(sorted(o["const"] for o in values["oneOf"]),
                         sorted(allowed), key)
    filled = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
    GkvmHypervisor.CheckParameterSyntax(filled)
    # A configuration made before the plugin has none of them: defaults.
    for key in own:
      del filled[key]
    GkvmHypervisor.CheckParameterSyntax(filled)
    for bad in ({"tpm": "tpm3"}, {"rng_rate": -1}, {"watchdog": "ib700"},
                {"cgroup_io_max": 5}):
      with self.assertRaises(errors.HypervisorError) as ctx:
        GkvmHypervisor.CheckParameterSyntax(dict(filled, **bad))
      self.assertIn(list(bad)[0], str(ctx.exception))
    # Free text is gkvm's to parse: a malformed ceiling is named by
    # ValidateParameters (gkvm's own check), a good one passes.
    GkvmHypervisor.CheckParameterSyntax(
      dict(filled, cgroup_io_max="rbps=20M,wiops=500"))
    with self.assertRaises(errors.HypervisorError) as ctx:
      GkvmHypervisor.ValidateParameters(
        dict(constants.HVC_DEFAULTS[constants.HT_KVM], kernel_path="",
             kvm_path=os.environ.get("GKVM_QEMU", "/usr/bin/kvm"),
             cgroup_io_max="rbps=fast"))
    self.assertIn("cgroup_io_max", str(ctx.exception))

  def test_the_class_is_complete(self):
    cls = hypervisor.GetHypervisorClass(constants.HT_KVM)
    self.assertIs(cls, GkvmHypervisor)
    self.assertEqual(sorted(cls.PARAMETERS),
                     sorted(constants.HVC_DEFAULTS[constants.HT_KVM]))
    self.assertTrue(cls.CAN_MIGRATE)
    # Every operation of Ganeti's interface is the plugin's own (none
    # falls back to BaseHypervisor's "not implemented").
    own = ["StartInstance", "StopInstance", "CleanupInstance",
           "RebootInstance", "ListInstances", "GetInstanceInfo",
           "GetAllInstancesInfo", "GetNodeInfo", "GetInstanceConsole",
           "Verify", "BalloonInstanceMemory", "CheckParameterSyntax",
           "ValidateParameters", "AssessParameters", "PowercycleNode",
           "HotplugSupported", "VerifyHotplugSupport", "HotAddDevice",
           "HotDelDevice", "HotModDevice", "ResizeDisk", "MigrationInfo",
           "AcceptInstance", "FinalizeMigrationDst", "MigrateInstance",
           "FinalizeMigrationSource", "GetMigrationStatus",
           "VersionsSafeForMigration"]
    for name in own:
      self.assertIn(name, vars(GkvmHypervisor), name)


class TestInstall(unittest.TestCase):
  """The one installation step, and its undoing."""

  def _kvm_class(self, site, first=""):
    code = ("import site; site.addsitedir(%r);%s"
            "from ganeti import hypervisor, constants;"
            "print(hypervisor.GetHypervisorClass(constants.HT_KVM).__name__)"
            % (site, first))
    env = dict(os.environ)
    # Only Ganeti on the path: the plugin must come from the site dir.
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(
      os.path.abspath(constants.__file__)))
    return subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True,
                          check=True).stdout.strip()

  def test_install_and_uninstall(self):
    site = tempfile.mkdtemp(prefix="gkvm-site-")
    hooks = tempfile.mkdtemp(prefix="gkvm-hooks-")
    env = dict(os.environ, GANETI_HOOKS_DIR=hooks)
    hook = os.path.join(hooks, "instance-remove-post.d", "gkvm-remove-state")
    try:
      script = os.path.join(os.path.dirname(HERE), "install")
      self.assertEqual(self._kvm_class(site), "KVMHypervisor")
      subprocess.run([script, "--prefix", site], check=True, env=env,
                     stdout=subprocess.DEVNULL)
      self.assertEqual(self._kvm_class(site), "GkvmHypervisor")
      # Ganeti's hook that removes a removed instance's state.
      self.assertTrue(os.access(hook, os.X_OK), hook)
      with open(hook) as f:
        text = f.read()
      # On every node, also those that never ran the instance: a name
      # unknown there is not an error.
      self.assertIn("--idempotent", text)
      self.assertIn("remove-state", text)
      # A process that imports the plugin's class before Ganeti's
      # hypervisor package (the class imports that package itself).
      self.assertEqual(self._kvm_class(
        site, "import gkvm_ganeti.hypervisor;"), "GkvmHypervisor")
      subprocess.run([script, "--uninstall", "--prefix", site], check=True,
                     env=env, stdout=subprocess.DEVNULL)
      self.assertEqual(self._kvm_class(site), "KVMHypervisor")
      self.assertEqual(os.listdir(site), [])
      self.assertFalse(os.path.exists(hook))
    finally:
      shutil.rmtree(site, ignore_errors=True)
      shutil.rmtree(hooks, ignore_errors=True)


class TestOneNode(unittest.TestCase):
  """The hypervisor call sequence on this node, as Ganeti's backend makes
  it, through Ganeti's objects."""

  @classmethod
  def setUpClass(cls):
    cls.tmp = tempfile.mkdtemp(prefix="gkvm-gnt-", dir="/tmp")
    os.environ["GKVM_RUN_DIR"] = os.path.join(cls.tmp, "run")
    cls.bridge = "gkvmgnt%d" % (os.getpid() % 1000)
    _sh("ip", "link", "add", cls.bridge, "type", "bridge")
    _sh("ip", "link", "set", cls.bridge, "up")
    cls.hv = GkvmHypervisor()

  @classmethod
  def tearDownClass(cls):
    subprocess.run(["ip", "link", "del", cls.bridge],
                   stderr=subprocess.DEVNULL)
    # Nothing may be left running.
    for name in cls.hv.ListInstances():
      cls.hv.StopInstance(None, force=True, name=name)
    shutil.rmtree(cls.tmp, ignore_errors=True)

  def _nic(self, mac, uuid, name):
    """A bridged NIC on the test's bridge, as Ganeti builds it."""
    return objects.NIC(mac=mac, ip=None, uuid=uuid, name=name,
                       nicparams={constants.NIC_MODE: constants.NIC_MODE_BRIDGED,
                                  constants.NIC_LINK: self.bridge,
                                  constants.NIC_VLAN: ""})

  def _instance(self, name, migration_port=None, **hv):
    hvparams = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
    hvparams.update(support.guest_hvparams())
    hvparams.update({
      constants.HV_VNC_BIND_ADDRESS: "",
      constants.HV_BOOT_ORDER: constants.HT_BO_DISK,
      # This machine has no /dev/vhost-net (Ganeti 3.1's default is on).
      constants.HV_VHOST_NET: False,
    })
    hvparams.update(hv)
    if migration_port:
      hvparams[constants.HV_MIGRATION_PORT] = migration_port
    beparams = {constants.BE_MAXMEM: 128, constants.BE_MINMEM: 128,
                constants.BE_VCPUS: 1, constants.BE_AUTO_BALANCE: True,
                constants.BE_ALWAYS_FAILOVER: False,
                constants.BE_SPINDLE_USE: 1}
    nic = self._nic("52:54:00:47:4e:01",
                    "6b1f2a8e-7a5d-4f0e-9d3c-1c2b3a4d5e6f", "eth0")
    inst = objects.Instance(name=name, primary_node="node1-uuid",
                            uuid="0d7d3c2e-4f5a-4b6c-8d9e-0a1b2c3d4e5f",
                            os="noop", hypervisor=constants.HT_KVM,
                            hvparams=hvparams, beparams=beparams,
                            nics=[nic], disks=[], disks_info=[],
                            admin_state=constants.ADMINST_UP,
                            network_port=None, tags=set(["gkvm-test"]))
    return inst

  def _disk(self, size_mib=4):
    path = os.path.join(self.tmp, "disk0.img")
    with open(path, "wb") as f:
      f.write(b"gkvm-ganeti-disk")
      f.truncate(size_mib << 20)
    disk = objects.Disk(dev_type=constants.DT_FILE, size=size_mib,
                        mode=constants.DISK_RDWR, logical_id=("loop", path),
                        uuid="9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
                        name="disk0", params={})
    return [(disk, path, None)]

  def _wait_gone(self, name, timeout=60):
    deadline = time.time() + timeout
    while self.hv.GetInstanceInfo(name) is not None:
      self.assertLess(time.time(), deadline, "%s never stopped" % name)
      time.sleep(0.2)

  def test_start_info_console_balloon_reboot_stop_cleanup(self):
    inst = self._instance("gnt1")
    hv = self.hv
    hv.StartInstance(inst, self._disk(), True)
    serial = support.Serial(os.path.join(os.environ["GKVM_RUN_DIR"], "ctrl",
                                 "gnt1.serial"))
    info = hv.GetInstanceInfo("gnt1")
    self.assertEqual(info[0], "gnt1")
    self.assertGreater(info[1], 0)
    self.assertEqual((info[2], info[3]), (128, 1))
    self.assertEqual(info[4], hv_base.HvInstanceState.RUNNING)
    self.assertIn("gnt1", hv.ListInstances())
    # Started paused: resumed as Ganeti does (through the same QMP).
    subprocess.run([os.environ["GKVM_BIN"], "resume", "gnt1"], check=True,
                   stdout=subprocess.DEVNULL)
    serial.wait_for(support.READY)
    # The disk and the NIC as the guest sees them.
    out = serial.run("dd if=/dev/vda bs=16 count=1 2>/dev/null; echo; "
                     "cat /sys/class/net/eth0/address", "disk")
    self.assertIn(b"gkvm-ganeti-disk", out)
    self.assertIn(b"52:54:00:47:4e:01", out)
    # The TAP is on the bridge.
    self.assertEqual(len(os.listdir("/sys/class/net/%s/brif" % self.bridge)),
                     1)

    all_info = hv.GetAllInstancesInfo()
    self.assertEqual([t[0] for t in all_info], ["gnt1"])
    node = hv.GetNodeInfo()
    for key in ("memory_total", "memory_free", "cpu_total", "hv_version"):
      self.assertIn(key, node)

    group = objects.NodeGroup(name="default", ndparams={})
    pnode = objects.Node(name="node1", uuid="node1-uuid", ndparams={})
    console = GkvmHypervisor.GetInstanceConsole(
      inst, pnode, group, inst.hvparams, inst.beparams)
    console.Validate()
    self.assertEqual(console.kind, constants.CONS_SSH)
    self.assertEqual(console.command[-2:], ["console", "gnt1"])

    # Hot plug, as Ganeti's backend calls it: a NIC and a disk appear in
    # the guest; the disk grows; both go away.
    hv.HotplugSupported(inst)
    nic2 = self._nic("52:54:00:47:4e:02",
                     "1f2e3d4c-5b6a-4789-8a7b-6c5d4e3f2a1b", "eth1")
    hv.VerifyHotplugSupport(inst, constants.HOTPLUG_ACTION_ADD,
                            constants.HOTPLUG_TARGET_NIC)
    hv.HotAddDevice(inst, constants.HOTPLUG_TARGET_NIC, nic2, None, 1)
    path = os.path.join(self.tmp, "disk1.img")
    with open(path, "wb") as f:
      f.write(b"gkvm-hotplugged")
      f.truncate(4 << 20)
    disk2 = objects.Disk(dev_type=constants.DT_FILE, size=4,
                         mode=constants.DISK_RDWR,
                         logical_id=("loop", path),
                         uuid="3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f",
                         name="disk1", params={})
    hv.HotAddDevice(inst, constants.HOTPLUG_TARGET_DISK, disk2,
                    (path, None), 1)
    out = serial.run("for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/block/vdb ]"
                     " && [ -e /sys/class/net/eth1 ] && break; sleep 1; done;"
                     " cat /sys/class/net/eth1/address; cat /sys/block/vdb/size;"
                     " dd if=/dev/vdb bs=15 count=1 2>/dev/null; echo",
                     "hot", timeout=60)
    self.assertIn(b"52:54:00:47:4e:02", out)
    self.assertIn(b"8192", out)
    self.assertIn(b"gkvm-hotplugged", out)
    # As Ganeti's LUInstanceGrowDisk calls it: the new size in bytes.
    hv.ResizeDisk(inst, disk2, 8 * 1024 * 1024)
    out = serial.run("sleep 1; cat /sys/block/vdb/size", "grown")
    self.assertIn(b"16384", out)
    # gnt-instance modify --net 1:modify,mac=...: the guest sees the new
    # MAC (the NIC is plugged again, as by Ganeti's driver); a change of
    # link only keeps the device.
    nic2.mac = "52:54:00:47:4e:03"
    hv.HotModDevice(inst, constants.HOTPLUG_TARGET_NIC, nic2, None, 1)
    out = serial.run("for i in $(seq 30); do grep -q 4e:03 "
                     "/sys/class/net/eth*/address 2>/dev/null && break;"
                     " sleep 0.5; done; cat /sys/class/net/eth*/address",
                     "newmac", timeout=60)
    self.assertIn(b"52:54:00:47:4e:03", out)
    self.assertNotIn(b"52:54:00:47:4e:02", out)
    hv.HotDelDevice(inst, constants.HOTPLUG_TARGET_DISK, disk2, None, 1)
    hv.HotDelDevice(inst, constants.HOTPLUG_TARGET_NIC, nic2, None, 1)
    out = serial.run("sleep 1; ls /sys/block /sys/class/net", "gone")
    self.assertNotIn(b"vdb", out)
    self.assertNotIn(b"eth1", out)

    hv.BalloonInstanceMemory(inst, 96)
    deadline = time.time() + 30
    while hv.GetInstanceInfo("gnt1")[2] != 96:
      self.assertLess(time.time(), deadline, "balloon never got to 96 MiB")
      time.sleep(0.2)

    # Reboot in place (reboot_behavior=reboot): the guest boots again.
    hv.RebootInstance(inst)
    serial.wait_for(support.READY)
    self.assertEqual(hv.GetInstanceInfo("gnt1")[4],
                     hv_base.HvInstanceState.RUNNING)

    # An ACPI stop (not forced): the power button, then Ganeti polls.
    hv.StopInstance(inst)
    self._wait_gone("gnt1")
    self.assertNotIn("gnt1", hv.ListInstances())
    hv.CleanupInstance("gnt1")
    serial.close()
    self.assertEqual(os.listdir("/sys/class/net/%s/brif" % self.bridge), [])

    # Started again and forced off.
    hv.StartInstance(inst, self._disk(), False)
    self.assertEqual(hv.GetInstanceInfo("gnt1")[4],
                     hv_base.HvInstanceState.RUNNING)
    hv.StopInstance(inst, force=True)
    self.assertIsNone(hv.GetInstanceInfo("gnt1"))
    hv.CleanupInstance("gnt1")
    self.assertEqual(hv.ListInstances(), [])

  def _boot(self, inst):
    """Starts `inst` as Ganeti does and waits for its guest."""
    self.hv.StartInstance(inst, self._disk(), True)
    serial = support.Serial(os.path.join(os.environ["GKVM_RUN_DIR"], "ctrl",
                                         "%s.serial" % inst.name))
    self.addCleanup(serial.close)
    subprocess.run([os.environ["GKVM_BIN"], "resume", inst.name], check=True,
                   stdout=subprocess.DEVNULL)
    serial.wait_for(support.READY)
    return self.hv.GetInstanceInfo(inst.name)[1], serial

  def _wait_state(self, name, state, timeout=60):
    deadline = time.time() + timeout
    while True:
      info = self.hv.GetInstanceInfo(name)
      if info is not None and info[4] == state:
        return info
      self.assertLess(time.time(), deadline, "%s never got to %s (%r)" %
                      (name, state, info))
      time.sleep(0.2)

  def test_user_shutdown_as_ganetis_kvmd_tells_it(self):
    """user_shutdown=true (Ganeti QA's TestInstanceUserDown): an
    administrator's stop ends the instance (not USER_down, no wait for the
    timeout); the guest's own poweroff and a QEMU killed by a signal are
    USER_down; the watcher's stop of a USER_down instance ends it at once."""
    inst = self._instance("gntush", **{constants.HV_KVM_USER_SHUTDOWN: True})
    hv = self.hv
    # gnt-instance shutdown: the power button, then Ganeti polls until the
    # instance is gone (its backend forces only after the timeout).
    self._boot(inst)
    hv.StopInstance(inst)
    self._wait_gone("gntush", timeout=60)
    hv.CleanupInstance("gntush")

    # Ganeti QA's user shutdown for KVM: pkill -f "-name NAME" (SIGTERM).
    pid, _ = self._boot(inst)
    os.kill(pid, signal.SIGTERM)
    info = self._wait_state("gntush", hv_base.HvInstanceState.SHUTDOWN)
    self.assertEqual(info[1], -1)
    self.assertNotIn("gntush", hv.ListInstances())
    self.assertIn("gntush", [t[0] for t in hv.GetAllInstancesInfo()])
    # The watcher (or gnt-instance shutdown) stops a USER_down instance.
    hv.StopInstance(inst)
    self.assertIsNone(hv.GetInstanceInfo("gntush"))
    hv.CleanupInstance("gntush")

    # The guest powers itself off: USER_down while its QEMU waits, and a
    # stop ends that QEMU at once.
    pid, serial = self._boot(inst)
    serial.sock.sendall(b"poweroff -f\n")
    info = self._wait_state("gntush", hv_base.HvInstanceState.SHUTDOWN)
    self.assertEqual(info[1], pid)
    hv.StopInstance(inst)
    self.assertIsNone(hv.GetInstanceInfo("gntush"))
    hv.CleanupInstance("gntush")
    self.assertEqual(hv.ListInstances(), [])

  def test_migration_there_and_back_through_ganetis_steps(self):
    """Two nodes, each gkvm in its own network namespace (joined by a
    veth pair): Ganeti's MigrationInfo, AcceptInstance, MigrateInstance,
    GetMigrationStatus and both Finalize calls, the guest answering after
    each hop; then a migration to an address where nobody listens fails
    and the source runs on."""
    from gkvm_ganeti.hypervisor import Gkvm
    tag = os.getpid() % 10000
    spaces = ["gkgA%d" % tag, "gkgB%d" % tag]
    addrs = ["10.231.7.1", "10.231.7.2"]
    veth = ["gkgva%d" % tag, "gkgvb%d" % tag]
    for n in spaces:
      _sh("ip", "netns", "add", n)
      self.addCleanup(subprocess.run, ["ip", "netns", "del", n],
                      stderr=subprocess.DEVNULL)
    _sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
    nodes = []
    for i, n in enumerate(spaces):
      _sh("ip", "link", "set", veth[i], "netns", n)
      _sh("ip", "-n", n, "addr", "add", addrs[i] + "/24", "dev", veth[i])
      _sh("ip", "-n", n, "link", "set", veth[i], "up")
      _sh("ip", "-n", n, "link", "set", "lo", "up")
      wrapper = os.path.join(self.tmp, "gkvm-%s" % n)
      with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n" %
                (n, os.environ["GKVM_BIN"]))
      os.chmod(wrapper, 0o755)
      node = GkvmHypervisor()
      node.gkvm = Gkvm(binary=wrapper,
                       run_dir=os.path.join(self.tmp, "run-%s" % n))
      nodes.append(node)
      self.addCleanup(subprocess.run, [wrapper, "--run-dir", node.gkvm.run_dir,
                                       "stop", "gntm", "--force"],
                      capture_output=True)
    port = 42000 + os.getpid() % 1000
    inst = self._instance("gntm", migration_port=port)
    inst.nics = []
    # The disk as Ganeti links it on each node; the accepting node opens
    # its own link, whatever the migration info says.
    ((disk, image, _),) = self._disk()
    inst.disks_info = [disk]
    links = []
    for i, node in enumerate(nodes):
      node.disk_links_dir = os.path.join(self.tmp, "links-%d" % i)
      os.mkdir(node.disk_links_dir)
      links.append(os.path.join(node.disk_links_dir, "gntm:0"))
      os.symlink(image, links[-1])
    nodes[0].StartInstance(inst, [(disk, links[0], None)], False)
    serial = support.Serial(os.path.join(nodes[0].gkvm.run_dir, "ctrl", "gntm.serial"))
    serial.answer()
    serial.close()
    for hop, (src, dst) in enumerate([(0, 1), (1, 0)]):
      s, d = nodes[src], nodes[dst]
      info = s.MigrationInfo(inst)
      d.AcceptInstance(inst, info, addrs[dst])
      (waiting,) = d.gkvm.call(["info", "gntm"])
      self.assertEqual(waiting["state"], "incoming")
      pid = waiting["pid"]
      with open("/proc/%d/cmdline" % pid, "rb") as f:
        argv = f.read().decode()
      self.assertIn(links[dst], argv)
      self.assertNotIn(links[src], argv)
      s.MigrateInstance("cluster", inst, addrs[dst], True)
      self.assertEqual(s.GetMigrationStatus(inst).status,
                       constants.HV_MIGRATION_COMPLETED)
      d.FinalizeMigrationDst(inst, info, True)
      s.FinalizeMigrationSource(inst, True, True)
      self.assertIsNone(s.GetInstanceInfo("gntm"), "hop %d" % hop)
      self.assertEqual(d.GetInstanceInfo("gntm")[4],
                       hv_base.HvInstanceState.RUNNING)
      serial = support.Serial(os.path.join(d.gkvm.run_dir, "ctrl", "gntm.serial"))
      out = serial.run("echo alive-$((40+hop))".replace("hop", str(hop)),
                       "after%d" % hop)
      self.assertIn(("alive-%d" % (40 + hop)).encode(), out)
      serial.close()
    # A destination that never listens: the migration fails, the source
    # is told so and runs on.
    s = nodes[0]
    with self.assertRaises(Exception):
      s.MigrateInstance("cluster", inst, addrs[1], True)
    s.FinalizeMigrationSource(inst, False, True)
    self.assertEqual(s.GetInstanceInfo("gntm")[4],
                     hv_base.HvInstanceState.RUNNING)
    s.StopInstance(inst, force=True)
    s.CleanupInstance("gntm")

  def test_an_instance_of_ganetis_own_driver_is_adopted_and_migrated(self):
    """Started by Ganeti 3.1's own KVMHypervisor (in the same run
    directory), then seen, migrated and stopped by the plugin."""
    import gc
    from ganeti import pathutils
    from gkvm_ganeti.hypervisor import Gkvm
    root = os.environ["GKVM_RUN_DIR"]
    ganeti_driver = support.ganeti_driver(root)
    log_dir = os.path.join(self.tmp, "ganeti-log")
    os.makedirs(log_dir, exist_ok=True)
    saved_log_dir, pathutils.LOG_KVM_DIR = pathutils.LOG_KVM_DIR, log_dir
    port = 43000 + os.getpid() % 1000
    # TCG: Ganeti 3.1 adds no accelerator option and leaves it to the
    # binary; plain qemu-system-x86_64 runs TCG.
    inst = self._instance("gntadopt", migration_port=port,
                          kvm_path=shutil.which("qemu-system-x86_64"))
    inst.nics = []
    try:
      driver = ganeti_driver()
      driver.StartInstance(inst, [], False)
      pid = driver.GetInstanceInfo("gntadopt")[1]
      # noded makes a driver object per request; this one's QMP
      # connection goes with it.
      del driver
      gc.collect()
    finally:
      pathutils.LOG_KVM_DIR = saved_log_dir
    self.addCleanup(lambda: [
      subprocess.run([os.environ["GKVM_BIN"], "--run-dir", d, "stop",
                      "gntadopt", "--force"], capture_output=True)
      for d in (root, os.path.join(self.tmp, "run-adopt-b"))])
    serial = support.Serial(os.path.join(root, "ctrl", "gntadopt.serial"))
    serial.answer()
    serial.close()
    a = self.hv
    self.assertIn("gntadopt", a.ListInstances())
    info = a.GetInstanceInfo("gntadopt")
    self.assertEqual((info[1], info[4]), (pid, hv_base.HvInstanceState.RUNNING))

    b = GkvmHypervisor()
    b.gkvm = Gkvm(run_dir=os.path.join(self.tmp, "run-adopt-b"))
    mig = a.MigrationInfo(inst)
    b.AcceptInstance(inst, mig, "127.0.0.1")
    a.MigrateInstance("cluster", inst, "127.0.0.1", True)
    b.FinalizeMigrationDst(inst, mig, True)
    a.FinalizeMigrationSource(inst, True, True)
    self.assertIsNone(a.GetInstanceInfo("gntadopt"))
    serial = support.Serial(os.path.join(b.gkvm.run_dir, "ctrl", "gntadopt.serial"))
    out = serial.run("echo adopted-$((6*7))", "landed")
    self.assertIn(b"adopted-42", out)
    serial.close()
    b.StopInstance(inst, force=True)
    b.CleanupInstance("gntadopt")
    self.assertEqual(b.ListInstances(), [])
    self.assertEqual(os.listdir(os.path.join(root, "pid")), [])

  def test_a_node_rolled_back_hands_its_instances_to_ganetis_driver(self):
    """gkvm started the instance and hot-plugged a disk into it; the
    plugin is uninstalled (`install --uninstall`): Ganeti 3.1's own driver
    reads its runtime file, unplugs and plugs that disk (the guest sees
    both), reports and stops it, and nothing of gkvm's is left."""
    import gc
    root = os.environ["GKVM_RUN_DIR"]
    inst = self._instance("gntback")
    inst.nics = []
    hv = self.hv
    _, serial = self._boot(inst)
    path = os.path.join(self.tmp, "back1.img")
    with open(path, "wb") as f:
      f.write(b"gkvm-rolled-back")
      f.truncate(4 << 20)
    disk = objects.Disk(dev_type=constants.DT_FILE, size=4,
                        mode=constants.DISK_RDWR, logical_id=("loop", path),
                        uuid="5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b",
                        name="back1", params={})
    hv.HotAddDevice(inst, constants.HOTPLUG_TARGET_DISK, disk, (path, None), 1)
    out = serial.run("for i in $(seq 20); do [ -e /sys/block/vdb ] && break;"
                     " sleep 0.5; done; ls /sys/block", "plugged", timeout=60)
    self.assertIn(b"vdb", out)

    site = tempfile.mkdtemp(prefix="gkvm-site-")
    self.addCleanup(shutil.rmtree, site, True)
    script = os.path.join(os.path.dirname(HERE), "install")
    subprocess.run([script, "--prefix", site], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([script, "--uninstall", "--prefix", site], check=True,
                   stdout=subprocess.DEVNULL)
    ctrl = os.listdir(os.path.join(root, "ctrl"))
    self.assertEqual([f for f in ctrl if f.startswith("gntback.events")
                      or f == "gntback.lock"], [])

    driver = support.ganeti_driver(root)()
    pid = driver.GetInstanceInfo("gntback")[1]
    self.assertGreater(pid, 0)
    driver.HotDelDevice(inst, constants.HOTPLUG_TARGET_DISK, disk, None, 1)
    out = serial.run("for i in $(seq 20); do [ -e /sys/block/vdb ] || break;"
                     " sleep 0.5; done; echo disks-$(ls /sys/block | tr -d '\\n')",
                     "unplugged", timeout=60)
    self.assertIn(b"disks-vda\r", out)
    driver.HotAddDevice(inst, constants.HOTPLUG_TARGET_DISK, disk,
                        (path, None), 1)
    out = serial.run("for i in $(seq 20); do [ -e /sys/block/vdb ] && break;"
                     " sleep 0.5; done; dd if=/dev/vdb bs=16 count=1"
                     " 2>/dev/null; echo", "replugged", timeout=60)
    self.assertIn(b"gkvm-rolled-back", out)
    driver.StopInstance(inst, force=True)
    support.wait_pid_gone(pid)
    driver.CleanupInstance("gntback")
    del driver
    gc.collect()
    left = [f for d in ("ctrl", "conf", "pid", "nic")
            for f in os.listdir(os.path.join(root, d))
            if f.startswith("gntback")]
    self.assertEqual(left, [])

  def test_parameters_are_checked_on_the_node(self):
    good = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
    # Ganeti's default kernel (/boot/vmlinuz-3-kvmU) is not on this node;
    # Ganeti's own driver refuses it here too.
    good[constants.HV_KERNEL_PATH] = ""
    good[constants.HV_INITRD_PATH] = ""
    good[constants.HV_VHOST_NET] = False
    GkvmHypervisor.CheckParameterSyntax(good)
    GkvmHypervisor.ValidateParameters(good)
    bad = dict(good)
    bad[constants.HV_SECURITY_MODEL] = constants.HT_SM_USER
    bad[constants.HV_SECURITY_DOMAIN] = "no-such-user-gkvm"
    with self.assertRaises(Exception) as ctx:
      GkvmHypervisor.ValidateParameters(bad)
    self.assertIn("no-such-user-gkvm", str(ctx.exception))
    # A QEMU that is not there (gnt-cluster modify -H kvm_path=...): refused
    # by Ganeti's file check and by gkvm (by parameter, not by wording).
    missing = dict(good)
    missing[constants.HV_KVM_PATH] = "/nonexistent/qemu-gkvm"
    with self.assertRaises(Exception) as ctx:
      GkvmHypervisor.ValidateParameters(missing)
    self.assertIn("/nonexistent/qemu-gkvm", str(ctx.exception))
    doc = plugin.Gkvm().call(["verify"] + GkvmHypervisor._hv_args(missing),
                             ok_codes=(1,))
    self.assertEqual([p["key"] for p in doc["invalid_params"]], ["kvm_path"])
    # A directory is not a QEMU either.
    nodir = dict(good)
    nodir[constants.HV_KVM_PATH] = "/usr/bin"
    with self.assertRaises(Exception) as ctx:
      GkvmHypervisor.ValidateParameters(nodir)
    self.assertIn("kvm_path", str(ctx.exception))
    warnings = GkvmHypervisor.AssessParameters(good)
    self.assertTrue(any("cpu_type" in w for w in warnings), warnings)

  def test_a_stop_of_an_instance_that_does_not_run(self):
    self.assertIsNone(self.hv.GetInstanceInfo("gnt-none"))
    self.hv.StopInstance(None, force=True, name="gnt-none")
    self.hv.CleanupInstance("gnt-none")


class TestServer(unittest.TestCase):
  """The plugin's calls through `gkvm serve`: a server killed, retired or
  answering garbage costs a call nothing, or fails it with a clear error."""

  def setUp(self):
    self.tmp = tempfile.mkdtemp(prefix="gkvm-gsrv-", dir="/tmp")
    self.run_dir = os.path.join(self.tmp, "run")
    os.makedirs(self.run_dir)
    self.gkvm = plugin.Gkvm(run_dir=self.run_dir)
    self.socket = self.gkvm.socket_path()

  def tearDown(self):
    # The server leaves once its socket is gone (within 2 s).
    shutil.rmtree(self.tmp, ignore_errors=True)

  def _server_pids(self):
    out = subprocess.run(["pgrep", "-f", "serve --socket " + self.socket],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]

  def _server(self):
    """The server's pid (its child forked ahead for the next call has the
    same command line)."""
    pids = self._server_pids()
    servers = [p for p in pids
               if int((support.proc_stat(p) or [0, 0])[1]) not in pids]
    self.assertEqual(len(servers), 1, pids)
    return servers[0], pids

  def test_calls_start_the_server_and_survive_its_kill(self):
    self.assertEqual(self.gkvm.call(["list"]), [])
    self.assertTrue(os.path.exists(self.socket), "no server was started")
    server, pids = self._server()
    os.kill(server, 9)
    # Its child waiting for a call dies with it.
    for pid in pids:
      support.wait_pid_gone(pid)
    # The socket is stale: the next call starts a new server.
    self.assertEqual(self.gkvm.call(["list"]), [])
    new, _ = self._server()
    self.assertNotIn(new, pids)

  def test_without_a_server_the_binary_answers(self):
    os.environ["GKVM_PLUGIN_SERVE"] = "0"
    try:
      self.assertEqual(self.gkvm.call(["list"]), [])
    finally:
      del os.environ["GKVM_PLUGIN_SERVE"]
    self.assertFalse(os.path.exists(self.socket))
    # A run dir that does not exist yet: no server there, the binary runs.
    other = plugin.Gkvm(run_dir=os.path.join(self.tmp, "none"))
    self.assertEqual(other.call(["list"]), [])

  def _fake_server(self, answer):
    """A socket answering `answer` (bytes) to every call (gkvm itself never
    answers garbage or another version: a fault only a fake can make)."""
    import socket
    import threading
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(self.socket)
    srv.listen(4)

    def loop():
      while True:
        try:
          conn, _ = srv.accept()
        except OSError:
          return
        conn.recv(65536)
        conn.sendall(answer)
        conn.close()
    threading.Thread(target=loop, daemon=True).start()
    self.addCleanup(srv.close)

  def test_garbage_from_the_server_is_a_clear_error(self):
    self._fake_server(b"{not json\n")
    with self.assertRaises(plugin.GkvmError) as ctx:
      self.gkvm.call(["list"])
    self.assertIn("answered garbage", str(ctx.exception))
    self.assertIn(self.socket, str(ctx.exception))

  def test_a_call_the_server_lost_is_not_run_again(self):
    # The child that took the call died before answering: the command may
    # have run in part, so the plugin says so rather than run it twice.
    self._fake_server(b"")
    with self.assertRaises(plugin.GkvmError) as ctx:
      self.gkvm.call(["list"])
    self.assertIn("without an answer", str(ctx.exception))

  def test_a_retired_server_hands_the_call_to_the_binary(self):
    self._fake_server(b'{"version": "0.1.0", "retired": true}\n')
    self.assertEqual(self.gkvm.call(["list"]), [])

  def test_a_server_of_another_version_is_refused(self):
    self._fake_server(b'{"version": "9.3.0", "code": 2, "stdout": "",'
                      b' "stderr": ""}\n')
    with self.assertRaises(plugin.GkvmError) as ctx:
      self.gkvm.call(["list"])
    self.assertIn("9.3", str(ctx.exception))

  def test_typed_requests_through_the_server_and_the_binary(self):
    """The typed API (what the plugin's Ganeti calls use) answers the same
    through the server and the binary; an error carries its kind, which
    the plugin decides by; a server that never answers ends the call at
    its deadline instead of blocking Ganeti's node daemon."""
    served = self.gkvm.api({"op": "info", "instances": []})
    self.assertTrue(os.path.exists(self.socket), "no server was started")
    os.environ["GKVM_PLUGIN_SERVE"] = "0"
    try:
      self.assertEqual(self.gkvm.api({"op": "info", "instances": []}), served)
      with self.assertRaises(plugin.GkvmError) as ctx:
        self.gkvm.api({"op": "resume", "instance": "nosuch"})
    finally:
      del os.environ["GKVM_PLUGIN_SERVE"]
    self.assertEqual(ctx.exception.kind, "not_running")
    with self.assertRaises(plugin.GkvmError) as ctx:
      self.gkvm.api({"op": "resume", "instance": "nosuch"})
    self.assertEqual(ctx.exception.kind, "not_running")
    with self.assertRaises(plugin.GkvmError) as ctx:
      self.gkvm.api({"op": "no_such_op"})
    self.assertEqual(ctx.exception.kind, "usage")

  def test_a_server_that_never_answers_meets_the_deadline(self):
    import socket
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(self.socket)
    srv.listen(4)
    self.addCleanup(srv.close)
    old = plugin.SERVE_ANSWER_TIMEOUT
    plugin.SERVE_ANSWER_TIMEOUT = 1
    try:
      # Taken into the socket's queue and never answered.
      with self.assertRaises(plugin.GkvmError) as ctx:
        self.gkvm.api({"op": "info", "instances": []})
    finally:
      plugin.SERVE_ANSWER_TIMEOUT = old
    self.assertIn("did not answer within", str(ctx.exception))


if __name__ == "__main__":
  unittest.main()
