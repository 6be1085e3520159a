# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""Two Ganeti 3.1 nodes (`integrations/ganeti/cluster up` and `add-node`:
each node in its own namespaces, a veth between their bridges, the second
node set up by Ganeti's own `gnt-node add` over SSH), whose hypervisor
`kvm` is gkvm on both, or Ganeti's own driver on the second (a site half
way through switching). Ganeti's command line moves an instance between
them; the guest is checked on each side.

Run by `integrations/ganeti/run-tests` (GKVM_BIN, GKVM_GUEST_DIR set there).
"""

import os
import subprocess
import tempfile
import unittest

from tests import support

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(os.path.dirname(HERE), "cluster")
RUN = "/run/ganeti/kvm-hypervisor"
NODES = ("node1.gkvm.test", "node2.gkvm.test")
# Ganeti's default migration_port, which the instances here keep.
MIGRATION_PORT = 8102


class _TwoNodes(object):
  """A two-node cluster for the test class; `ganeti_driver` says whether
  the second node keeps Ganeti's own KVM driver."""

  ganeti_driver = False

  @classmethod
  def setUpClass(cls):
    cls.dir = tempfile.mkdtemp(prefix="gkvm-2nodes-", dir="/tmp")
    try:
      for step in ([CLUSTER, "up", cls.dir, os.environ["GKVM_BIN"]],
                   [CLUSTER, "add-node", cls.dir] +
                   (["--ganeti-driver"] if cls.ganeti_driver else [])):
        subprocess.run(step, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    except subprocess.CalledProcessError as err:
      subprocess.run([CLUSTER, "down", cls.dir])
      raise AssertionError("%s failed: %s" % (" ".join(err.cmd[:2]),
                                             err.stderr.decode()))
    cls.node_dirs = (cls.dir, os.path.join(cls.dir, "node2"))
    cls.roots = []
    for d in cls.node_dirs:
      with open(os.path.join(d, "pid")) as f:
        cls.roots.append("/proc/%s/root" % f.read().strip())

  @classmethod
  def tearDownClass(cls):
    if os.environ.get("GKVM_KEEP_CLUSTER"):
      print("cluster kept at %s (cluster down %s)" % (cls.dir, cls.dir))
      return
    subprocess.run([CLUSTER, "down", cls.dir])

  def run_on(self, node, *argv, **kw):
    proc = subprocess.run([CLUSTER, "run", self.node_dirs[node]] + list(argv),
                          capture_output=True, text=True, timeout=600)
    if kw.get("check", True):
      self.assertEqual(proc.returncode, 0, "%s: %s%s" % (" ".join(argv),
                                                         proc.stdout,
                                                         proc.stderr))
    return proc

  def gnt(self, *argv):
    return self.run_on(0, *argv).stdout

  def primary(self, name):
    out = self.gnt("gnt-instance", "list", "--no-headers", "-o", "pnode", name)
    return NODES.index(out.strip())

  def qemu_pids(self, name):
    """The live QEMU of `name` on each node (None where there is none),
    by its pid file in the node's Ganeti run directory."""
    pids = []
    for root in self.roots:
      # Pids of the node's PID namespace: its own /proc says.
      try:
        with open(root + RUN + "/pid/" + name) as f:
          pid = int(f.read())
        with open(root + "/proc/%d/cmdline" % pid, "rb") as f:
          alive = name.encode() in f.read()
        with open(root + "/proc/%d/stat" % pid) as f:
          state = f.read().rsplit(")", 1)[1].split()[0]
        pids.append(pid if alive and state not in ("Z", "X") else None)
      except (OSError, ValueError, IndexError):
        pids.append(None)
    return pids

  def assert_runs_on(self, name, node, why):
    self.assertEqual(self.primary(name), node, why)
    pids = self.qemu_pids(name)
    self.assertIsNotNone(pids[node], "%s: no QEMU on node%d" % (why, node + 1))
    self.assertIsNone(pids[1 - node],
                      "%s: a QEMU left on node%d" % (why, 2 - node))

  def guest(self, name, node):
    return support.Serial(self.roots[node] + RUN + "/ctrl/" + name + ".serial")

  def add_instance(self, name, mac, template="sharedfile"):
    hvp = support.guest_hvparams()
    hvp["kvm_path"] = "/usr/bin/qemu-system-x86_64"
    hv = ",".join("%s=%s" % kv for kv in sorted(hvp.items()))
    disk = [] if template == "diskless" else ["--disk", "0:size=1G"]
    self.gnt("gnt-instance", "add", "-n", NODES[0], "-t", template,
             "-o", "noop",
             "-B", "maxmem=128M,minmem=128M,vcpus=1", "-H", "kvm:" + hv,
             "--net", "0:mac=" + mac, *disk, name)
    self.addCleanup(self.run_on, 0, "gnt-instance", "remove", "-f", name,
                    check=False)
    self.assert_runs_on(name, 0, "added")
    if template != "diskless":
      # What check_guest reads back wherever the instance goes.
      serial = self.guest(name, 0)
      serial.answer()
      serial.run("printf gkvm-disk! | dd of=/dev/vda conv=fsync 2>/dev/null",
                 "wrote")
      serial.close()

  def run_by_gkvm(self, name, node):
    """Whether gkvm runs `name` on `node`: it keeps an event log there,
    Ganeti's driver does not."""
    return os.path.exists(self.roots[node] + RUN + "/ctrl/" + name +
                          ".events.out")

  def check_guest(self, name, node, why, marker):
    """The guest answers on `node` and still has what was written on its
    disk."""
    serial = self.guest(name, node)
    try:
      serial.answer()
      out = serial.run("dd if=/dev/vda bs=10 count=1 2>/dev/null", marker)
      self.assertIn(b"gkvm-disk!", out, why)
    finally:
      serial.close()


class TestTwoNodes(_TwoNodes, unittest.TestCase):
  """Both nodes run gkvm."""

  def test_moves_between_nodes(self):
    name = "gm1.gkvm.test"
    self.add_instance(name, "52:54:00:47:4e:31")

    steps = [
      (("gnt-instance", "migrate", "-f", name), 1, "live migration"),
      (("gnt-instance", "migrate", "-f", "--non-live", name), 0,
       "non-live migration"),
      (("gnt-instance", "migrate", "-f", "--cleanup", name), 0,
       "migration cleanup"),
      (("gnt-instance", "failover", "-f", name), 1, "failover"),
      (("gnt-node", "migrate", "-f", NODES[1]), 0, "node migration"),
    ]
    for i, (argv, node, why) in enumerate(steps):
      self.gnt(*argv)
      self.assert_runs_on(name, node, why)
      self.check_guest(name, node, why, "step%d" % i)

    # A stopped instance fails over and starts on the other node.
    self.gnt("gnt-instance", "stop", name)
    self.assertEqual(self.qemu_pids(name), [None, None])
    self.gnt("gnt-instance", "failover", "-f", name)
    self.gnt("gnt-instance", "start", name)
    self.assert_runs_on(name, 1, "stopped failover")
    self.check_guest(name, 1, "stopped failover", "stopped")

    # A migration that cannot happen (the destination's migration port is
    # taken): Ganeti's job fails, the source runs on, one QEMU.
    self.check_failed_migration(name, MIGRATION_PORT)

  def check_failed_migration(self, name, port):
    # Occupy the destination's (node1's) migration port for the length of
    # the migration.
    holder = subprocess.Popen(
      [CLUSTER, "run", self.node_dirs[0], "python3", "-c",
       "import socket,sys,time\n"
       "s=socket.socket()\n"
       "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
       "s.bind(('0.0.0.0',%d))\n"
       "s.listen()\n"
       "print('held',flush=True)\n"
       "time.sleep(600)\n" % port],
      stdout=subprocess.PIPE, text=True)
    try:
      self.assertEqual(holder.stdout.readline().strip(), "held")
      proc = self.run_on(0, "gnt-instance", "migrate", "-f", name,
                         check=False)
      self.assertNotEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    finally:
      holder.kill()
      holder.wait()
    self.assert_runs_on(name, 1, "failed migration")
    self.check_guest(name, 1, "failed migration", "failed")


class TestMixedCluster(_TwoNodes, unittest.TestCase):
  """The first node runs gkvm, the second Ganeti's own KVM driver: a site
  half way through switching. An instance moves each way and back; then
  the first node goes back to Ganeti's driver (the plugin uninstalled,
  its instance handed over without a restart) and it moves again."""

  ganeti_driver = True

  def test_moves_between_gkvm_and_ganetis_driver(self):
    name = "gx1.gkvm.test"
    self.add_instance(name, "52:54:00:47:4e:41")
    self.assertTrue(self.run_by_gkvm(name, 0), "not started by gkvm")
    # (Non-live only towards gkvm: Ganeti's driver never resumes a guest
    # that arrives paused, and QEMU keeps the source's paused state, so
    # after a non-live migration onto its node the guest stays paused,
    # between two of its own nodes too; gkvm resumes it.)
    steps = [
      (("gnt-instance", "migrate", "-f", name), 1,
       "gkvm to Ganeti's driver"),
      (("gnt-instance", "migrate", "-f", "--non-live", name), 0,
       "Ganeti's driver to gkvm, non-live"),
      (("gnt-instance", "migrate", "-f", name), 1,
       "gkvm to Ganeti's driver, again"),
      (("gnt-instance", "migrate", "-f", name), 0,
       "Ganeti's driver to gkvm"),
    ]
    for i, (argv, node, why) in enumerate(steps):
      self.gnt(*argv)
      self.assert_runs_on(name, node, why)
      self.assertEqual(self.run_by_gkvm(name, node), node == 0, why)
      self.check_guest(name, node, why, "step%d" % i)

    # The first node goes back to Ganeti's driver: its running instance
    # is handed over, and migrates as Ganeti's own.
    with open(os.path.join(self.dir, "site")) as f:
      site = f.read().strip()
    self.run_on(0, os.path.join(os.path.dirname(CLUSTER), "install"),
                "--uninstall", "--prefix", site)
    # Its node daemon imported the plugin at start: restarted, as the
    # install script says.
    self.run_on(0, "/usr/lib/ganeti/daemon-util", "stop", "ganeti-noded")
    self.run_on(0, "/usr/lib/ganeti/daemon-util", "start", "ganeti-noded")
    self.assert_runs_on(name, 0, "handed over")
    self.check_guest(name, 0, "handed over", "handed")
    for i, node in enumerate((1, 0)):
      why = "both nodes on Ganeti's driver, hop %d" % i
      self.gnt("gnt-instance", "migrate", "-f", name)
      self.assert_runs_on(name, node, why)
      self.assertFalse(self.run_by_gkvm(name, node), "%s: gkvm runs it" % why)
      self.check_guest(name, node, why, "back%d" % i)


if __name__ == "__main__":
  unittest.main()
