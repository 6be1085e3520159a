# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""A one-node Ganeti 3.1 cluster (`integrations/ganeti/cluster`: Debian's
Ganeti, its daemons started by `gnt-cluster init`, the node in its own
namespaces) whose hypervisor `kvm` is gkvm: Ganeti's command line, through
its daemons and the node daemon's hypervisor calls, drives gkvm.

Run by `integrations/ganeti/run-tests` (GKVM_BIN, GKVM_GUEST_DIR set there).
"""

import json
import os
import subprocess
import tempfile
import unittest

from tests import support

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(os.path.dirname(HERE), "cluster")
# Ganeti's KVM run directory (/var/run is a symlink to /run, which would
# leave the node's mount namespace when read through /proc/PID/root).
RUN = "/run/ganeti/kvm-hypervisor"
NAME = "gi1.gkvm.test"


class TestOneNodeCluster(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    cls.dir = tempfile.mkdtemp(prefix="gkvm-cluster-", dir="/tmp")
    try:
      subprocess.run([CLUSTER, "up", cls.dir, os.environ["GKVM_BIN"]],
                     check=True, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)
    except subprocess.CalledProcessError as err:
      subprocess.run([CLUSTER, "down", cls.dir])
      raise AssertionError("cluster up failed: %s" % err.stderr.decode())
    with open(os.path.join(cls.dir, "pid")) as f:
      # The node's files as seen from here (its mount namespace).
      cls.node_root = "/proc/%s/root" % f.read().strip()

  @classmethod
  def tearDownClass(cls):
    subprocess.run([CLUSTER, "down", cls.dir])

  def gnt(self, *argv):
    proc = subprocess.run([CLUSTER, "run", self.dir] + list(argv),
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, "%s: %s%s" % (" ".join(argv),
                                                       proc.stdout,
                                                       proc.stderr))
    return proc.stdout

  def gnt_anyway(self, *argv):
    """A command whose failure does not matter (cleanup)."""
    subprocess.run([CLUSTER, "run", self.dir] + list(argv),
                   capture_output=True, timeout=300)

  def node(self, path):
    return self.node_root + path

  def gkvm_info(self):
    """What gkvm itself says runs on the node (Ganeti's run directory)."""
    return json.loads(self.gnt("gkvm", "--json", "--run-dir", RUN, "info"))

  def qemu_pid(self):
    with open(self.node(RUN + "/pid/" + NAME)) as f:
      return int(f.read())

  def taps(self):
    return sorted(os.listdir(self.node("/sys/class/net/gnt0/brif")))

  def serial(self):
    return self.serial_of(NAME)

  def serial_of(self, name):
    return support.Serial(self.node(RUN + "/ctrl/" + name + ".serial"))

  def test_instance_life_through_ganetis_command_line(self):
    hvp = support.guest_hvparams()
    hvp["kvm_path"] = "/usr/bin/qemu-system-x86_64"
    hv = ",".join("%s=%s" % kv for kv in sorted(hvp.items()))
    # Ganeti's default reboot (hard) ends QEMU and starts another.
    out = self.gnt("gnt-instance", "add", "-n", "node1.gkvm.test",
                   "-t", "diskless", "-o", "noop",
                   "-B", "maxmem=128M,minmem=128M,vcpus=1", "-H", "kvm:" + hv,
                   "--net", "0:mac=52:54:00:47:4e:11", NAME)
    # gkvm started it: its record and event log are in Ganeti's run dir.
    info = self.gkvm_info()
    self.assertEqual([(i["name"], i["state"]) for i in info],
                     [(NAME, "running")])
    self.assertTrue(os.path.exists(self.node(RUN + "/ctrl/" + NAME +
                                             ".events.out")))
    serial = self.serial()
    serial.answer()
    out = serial.run("cat /sys/class/net/eth0/address", "mac")
    self.assertIn(b"52:54:00:47:4e:11", out)
    self.assertEqual(len(self.taps()), 1)

    out = self.gnt("gnt-instance", "info", NAME)
    self.assertIn("actual state is up", out)
    self.assertIn("MAC: 52:54:00:47:4e:11", out)
    out = self.gnt("gnt-instance", "list", "--no-headers",
                   "-o", "name,status,oper_ram,oper_vcpus")
    self.assertEqual(out.split(), [NAME, "running", "128M", "1"])

    # Hot plug (Ganeti 3.1 hot-plugs by default; --no-hotplug turns it off).
    out = self.gnt("gnt-instance", "modify", "--net",
                   "add:mac=52:54:00:47:4e:12", NAME)
    self.assertIn("hotplug:done", out)
    out = serial.run("for i in 1 2 3 4 5 6 7 8 9 10; do"
                     " [ -e /sys/class/net/eth1 ] && break; sleep 1; done;"
                     " cat /sys/class/net/eth1/address", "hot", timeout=60)
    self.assertIn(b"52:54:00:47:4e:12", out)
    self.assertEqual(len(self.taps()), 2)
    out = self.gnt("gnt-instance", "modify", "--net", "1:remove", NAME)
    self.assertIn("hotplug:done", out)
    out = serial.run("sleep 1; ls /sys/class/net", "gone")
    self.assertNotIn(b"eth1", out)
    self.assertEqual(len(self.taps()), 1)

    # A soft reboot is the hypervisor's reboot: same QEMU, the guest
    # boots again.
    pid = self.qemu_pid()
    self.gnt("gnt-instance", "reboot", "--type=soft", NAME)
    serial.wait_for(support.READY)
    self.assertEqual(self.qemu_pid(), pid)
    serial.close()
    # Ganeti's default (hard) reboot: ACPI stop, then a new QEMU.
    self.gnt("gnt-instance", "reboot", NAME)
    self.assertNotEqual(self.qemu_pid(), pid)
    serial = self.serial()
    serial.answer()
    serial.close()

    self.gnt("gnt-instance", "stop", NAME)
    self.assertEqual(self.gkvm_info(), [])
    self.assertEqual(self.taps(), [])
    out = self.gnt("gnt-instance", "list", "--no-headers", "-o", "status")
    self.assertEqual(out.split(), ["ADMIN_down"])

    self.gnt("gnt-instance", "start", NAME)
    self.assertEqual([i["state"] for i in self.gkvm_info()], ["running"])
    serial = self.serial()
    serial.answer()
    serial.close()

    self.gnt("gnt-instance", "remove", "-f", NAME)
    self.assertEqual(self.gkvm_info(), [])
    self.assertEqual(self.taps(), [])
    self.assertEqual(self.gnt("gnt-instance", "list", "--no-headers"), "")
    for sub in ("pid", "conf", "ctrl", "nic"):
      self.assertEqual(os.listdir(self.node(RUN + "/" + sub)), [], sub)

  def test_gkvms_own_parameters_through_ganeti(self):
    """gkvm's parameters beyond Ganeti's 65, registered with Ganeti by the
    plugin: `gnt-instance add -H` takes them (rng, watchdog, tpm) and they
    reach gkvm (the devices on QEMU's command line, the guest's hwrng, the
    instance's swtpm); Ganeti refuses a bad value by name; `modify -H`
    changes one for the next start; removing the instance removes its
    TPM's state from the node."""
    name = "gi4.gkvm.test"
    hvp = support.guest_hvparams()
    hvp["kvm_path"] = "/usr/bin/qemu-system-x86_64"
    hvp.update({"rng": "virtio", "watchdog": "i6300esb", "tpm": "tpm2"})
    # A TPM needs a kernel that firmware boots (gkvm refuses a PVH one).
    hvp["kernel_path"] = hvp["kernel_path"].replace("vmlinux", "bzImage")
    hv = ",".join("%s=%s" % kv for kv in sorted(hvp.items()))
    try:
      self.gnt("gnt-instance", "add", "-n", "node1.gkvm.test",
               "-t", "diskless", "-o", "noop",
               "-B", "maxmem=128M,minmem=128M,vcpus=1", "-H", "kvm:" + hv,
               "--net", "0:mac=52:54:00:47:4e:41", name)
      with open(self.node(RUN + "/pid/" + name)) as f:
        pid = int(f.read())
      with open(self.node("/proc/%d/cmdline" % pid), "rb") as f:
        argv = f.read().split(b"\0")
      for device in (b"virtio-rng-pci", b"i6300esb", b"tpm-crb"):
        self.assertTrue(any(device in a for a in argv), device)
      info = json.loads(self.gnt("gkvm", "--json", "--run-dir", RUN, "info",
                                 name))
      self.assertEqual([h["kind"] for h in info[0]["helpers"]], ["swtpm"])
      self.assertTrue(info[0]["helpers"][0]["pid"])
      serial = self.serial_of(name)
      serial.answer()
      out = serial.run("cat /sys/class/misc/hw_random/rng_current", "rng")
      self.assertIn(b"virtio_rng", out)
      serial.close()
      out = self.gnt("gnt-instance", "info", name)
      self.assertIn("tpm: tpm2", out)
      bad = subprocess.run([CLUSTER, "run", self.dir, "gnt-instance",
                            "modify", "-H", "tpm=tpm3", name],
                           capture_output=True, text=True, timeout=300)
      self.assertNotEqual(bad.returncode, 0)
      self.assertIn("tpm", bad.stdout + bad.stderr)
      self.gnt("gnt-instance", "modify", "-H", "rng=none", name)
      self.gnt("gnt-instance", "reboot", name)
      with open(self.node(RUN + "/pid/" + name)) as f:
        pid = int(f.read())
      with open(self.node("/proc/%d/cmdline" % pid), "rb") as f:
        self.assertNotIn(b"virtio-rng-pci", f.read())
      # The TPM's state is on the node until Ganeti removes the instance
      # (the plugin's hook then removes it).
      state = self.node("/var/lib/gkvm/instances/" + name)
      self.assertTrue(os.path.isdir(state + "/tpm"), state)
      self.gnt("gnt-instance", "remove", "-f", name)
      self.assertFalse(os.path.exists(state), state)
    finally:
      self.gnt_anyway("gnt-instance", "remove", "-f", name)

  def test_site_hooks_and_cluster_settings_reach_gkvm(self):
    """A site that replaced Ganeti's networking with its kvm-vif-bridge
    hook sees it run for gkvm's NICs (through Ganeti's kvm-ifup, as its
    own driver runs it); the cluster's uid pool reaches gkvm."""
    name = "gi2.gkvm.test"
    hook = os.path.join(self.dir, "state", "etc", "kvm-vif-bridge")
    with open(hook, "w") as f:
      f.write("#!/bin/sh\n"
              "echo \"$INTERFACE $MAC $MODE $LINK\" >> /etc/ganeti/hook.log\n"
              "ip link set \"$INTERFACE\" up\n"
              "ip link set \"$INTERFACE\" master \"$LINK\"\n")
    os.chmod(hook, 0o755)
    self.addCleanup(os.remove, hook)
    self.gnt("gnt-cluster", "modify", "--uid-pool=20000-20099")
    self.addCleanup(self.gnt, "gnt-cluster", "modify", "--uid-pool=")
    hvp = support.guest_hvparams()
    hvp["kvm_path"] = "/usr/bin/qemu-system-x86_64"
    hv = ",".join("%s=%s" % kv for kv in sorted(hvp.items()))
    self.gnt("gnt-instance", "add", "-n", "node1.gkvm.test",
             "-t", "diskless", "-o", "noop",
             "-B", "maxmem=128M,minmem=128M,vcpus=1", "-H", "kvm:" + hv,
             "--net", "0:mac=52:54:00:47:4e:21", name)
    self.addCleanup(self.gnt, "gnt-instance", "remove", "-f", name)
    with open(os.path.join(self.dir, "state", "etc", "hook.log")) as f:
      log = f.read().split()
    self.assertEqual(log[1:], ["52:54:00:47:4e:21", "bridged", "gnt0"])
    self.assertIn(log[0], self.taps())
    with open(os.path.join(self.dir, "state", "etc", "gkvm-node.toml")) as f:
      config = f.read()
    self.assertIn('uid_pool = "20000-20099"', config)
    self.assertIn('nic_up_script = "/usr/lib/ganeti/kvm-ifup"', config)
    serial = support.Serial(self.node(RUN + "/ctrl/" + name + ".serial"))
    serial.answer()
    out = serial.run("cat /sys/class/net/eth0/address", "mac")
    serial.close()
    self.assertIn(b"52:54:00:47:4e:21", out)

  def test_instance_communication(self):
    """Ganeti 3.1's instance communication: an instance added with
    --communication gets a NIC on the cluster's communication network
    whose TAP is gnt.com.N, configured by Ganeti's own kvm-ifup-os
    (169.254.169.254 on the TAP, a host route to the instance's address,
    the node's dnsmasq leasing it): the guest gets its address by DHCP and
    reaches the node. `modify --communication no/yes` on the running
    instance unplugs and plugs it again (Ganeti's own driver hot-plugs it
    under a plain TAP name, which its kvm-ifup-os ignores)."""
    name = "gi3.gkvm.test"
    self.gnt("gnt-cluster", "modify",
             "--instance-communication-network=gkvmcomm")
    # Undone in reverse, also after a failure (the add may leave the
    # instance behind).
    self.addCleanup(self.gnt_anyway, "gnt-network", "remove", "gkvmcomm")
    self.addCleanup(self.gnt_anyway, "gnt-network", "disconnect", "gkvmcomm")
    self.addCleanup(self.gnt_anyway, "gnt-cluster", "modify",
                    "--instance-communication-network=")
    self.addCleanup(self.gnt_anyway, "gnt-instance", "remove", "-f", name)
    hvp = support.guest_hvparams()
    hvp["kvm_path"] = "/usr/bin/qemu-system-x86_64"
    hv = ",".join("%s=%s" % kv for kv in sorted(hvp.items()))
    self.gnt("gnt-instance", "add", "-n", "node1.gkvm.test",
             "-t", "diskless", "-o", "noop", "--communication=yes",
             "-B", "maxmem=128M,minmem=128M,vcpus=1", "-H", "kvm:" + hv,
             "--net", "0:mac=52:54:00:47:4e:31", name)
    ip = self.gnt("gnt-instance", "list", "--no-headers", "-o", "nic.ip/1",
                  name).strip()
    self.assertTrue(ip.startswith("169.254."), ip)

    def communication_taps():
      return sorted(t for t in os.listdir(self.node("/sys/class/net"))
                    if t.startswith("gnt.com."))

    [tap] = communication_taps()
    # What kvm-ifup-os made of it, read in the node's network namespace.
    addrs = self.gnt("ip", "-o", "-4", "addr", "show", "dev", tap)
    self.assertIn("169.254.169.254/32", addrs)
    self.assertIn("%s dev %s" % (ip, tap), self.gnt("ip", "route"))
    with open(self.node("/run/ganeti/dnsmasq.hosts")) as f:
      self.assertIn("," + ip, f.read())

    serial = self.serial_of(name)
    serial.answer()
    out = serial.run("ip link set eth1 up; udhcpc -i eth1 -n -q -t 10 -T 2"
                     " -s /bin/true 2>&1; ip addr add %s/16 dev eth1;"
                     " ping -c 2 -W 5 169.254.169.254" % ip, "dhcp",
                     timeout=90)
    self.assertIn(("lease of %s obtained" % ip).encode(), out)
    self.assertRegex(out, rb"[12] packets received")

    out = self.gnt("gnt-instance", "modify", "--communication=no", name)
    self.assertIn("hotplug:done", out)
    self.assertEqual(communication_taps(), [])
    out = self.gnt("gnt-instance", "modify", "--communication=yes", name)
    self.assertIn("hotplug:done", out)
    [tap] = communication_taps()
    self.assertIn("169.254.169.254/32",
                  self.gnt("ip", "-o", "-4", "addr", "show", "dev", tap))
    serial.close()


if __name__ == "__main__":
  unittest.main()
