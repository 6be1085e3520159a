# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""Ganeti job times on a two-node cluster (`integrations/ganeti/cluster`),
`kvm` being gkvm on both nodes, then Ganeti 3.1's own driver on both, in
the same run: add+start, shutdown, startup, reboot, migrate, failover,
grow-disk and NIC hot-add of a sharedfile instance booting the test guest
(TCG: this machine's nested KVM stalls a Linux guest). Each time is the
`gnt-*` command's wall time (submit to success), the median of ROUNDS.

Run by `integrations/ganeti/run-tests --bench-cluster [GKVM_BINARY]`
(root; give it a release build). Prints a Markdown table.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

from tests import support

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(HERE, "cluster")
RUN = "/run/ganeti/kvm-hypervisor"
ROUNDS = int(os.environ.get("GKVM_BENCH_ROUNDS", "3"))
NAME = "gb1.gkvm.test"


class Cluster(object):

  def __init__(self, gkvm, ganeti_driver):
    self.dir = tempfile.mkdtemp(prefix="gkvm-bench-", dir="/tmp")
    subprocess.run([CLUSTER, "up", self.dir, gkvm], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if ganeti_driver:
      with open(os.path.join(self.dir, "site")) as f:
        site = f.read().strip()
      self.gnt(os.path.join(HERE, "install"), "--uninstall", "--prefix", site)
      # The node daemon imported the plugin when it started.
      self.gnt("/usr/lib/ganeti/daemon-util", "stop", "ganeti-noded")
      self.gnt("/usr/lib/ganeti/daemon-util", "start", "ganeti-noded")
    subprocess.run([CLUSTER, "add-node", self.dir] +
                   (["--ganeti-driver"] if ganeti_driver else []),
                   check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    self.roots = []
    for d in (self.dir, os.path.join(self.dir, "node2")):
      with open(os.path.join(d, "pid")) as f:
        self.roots.append("/proc/%s/root" % f.read().strip())

  def down(self):
    subprocess.run([CLUSTER, "down", self.dir])

  def gnt(self, *argv):
    proc = subprocess.run([CLUSTER, "run", self.dir] + list(argv),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
      raise RuntimeError("%s: %s%s" % (" ".join(argv), proc.stdout,
                                       proc.stderr))
    return proc.stdout

  def timed(self, *argv):
    start = time.monotonic()
    self.gnt(*argv)
    return time.monotonic() - start

  def primary(self):
    node = self.gnt("gnt-instance", "list", "--no-headers", "-o", "pnode",
                    NAME).strip()
    return 0 if node.startswith("node1") else 1

  def guest_ready(self):
    """Waits until the guest answers (not timed): an ACPI shutdown needs
    a booted guest."""
    serial = support.Serial(self.roots[self.primary()] + RUN + "/ctrl/" +
                            NAME + ".serial", timeout=60)
    try:
      serial.answer(timeout=120)
    finally:
      serial.close()


def measure(cluster):
  hvp = support.guest_hvparams()
  hvp["kvm_path"] = "/usr/bin/qemu-system-x86_64"
  hv = ",".join("%s=%s" % kv for kv in sorted(hvp.items()))
  times = dict((op, []) for op in OPS)
  for r in range(ROUNDS):
    times["add+start"].append(cluster.timed(
      "gnt-instance", "add", "-n", "node1.gkvm.test", "-t", "sharedfile",
      "-o", "noop", "-B", "maxmem=128M,minmem=128M,vcpus=1",
      "-H", "kvm:" + hv, "--net", "0:mac=52:54:00:47:4f:%02x" % r,
      "--disk", "0:size=256M", NAME))
    cluster.guest_ready()
    times["grow-disk"].append(cluster.timed(
      "gnt-instance", "grow-disk", NAME, "0", "128M"))
    times["NIC hot-add"].append(cluster.timed(
      "gnt-instance", "modify", "--net", "add", NAME))
    times["reboot"].append(cluster.timed("gnt-instance", "reboot", NAME))
    cluster.guest_ready()
    times["shutdown"].append(cluster.timed("gnt-instance", "shutdown", NAME))
    times["startup"].append(cluster.timed("gnt-instance", "startup", NAME))
    cluster.guest_ready()
    times["migrate"].append(cluster.timed("gnt-instance", "migrate", "-f",
                                          NAME))
    cluster.guest_ready()
    times["failover"].append(cluster.timed("gnt-instance", "failover", "-f",
                                           NAME))
    cluster.gnt("gnt-instance", "remove", "-f", NAME)
  return dict((op, statistics.median(v)) for op, v in times.items())


OPS = ["add+start", "shutdown", "startup", "reboot", "migrate", "failover",
       "grow-disk", "NIC hot-add"]


def main(gkvm):
  results = {}
  for label, ganeti_driver in (("gkvm", False), ("ganeti", True)):
    cluster = Cluster(gkvm, ganeti_driver)
    try:
      results[label] = measure(cluster)
    finally:
      cluster.down()
  print("| Ganeti job (median of %d, s) | gkvm | Ganeti's driver | ratio |"
        % ROUNDS)
  print("|---|---|---|---|")
  for op in OPS:
    a, b = results["gkvm"][op], results["ganeti"][op]
    print("| %s | %.2f | %.2f | %.2f× |" % (op, a, b, a / b))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.environ["GKVM_BIN"])
