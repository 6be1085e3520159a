# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""What the plugin's tests and its benchmark share."""

import os
import socket
import time

from ganeti import constants
from ganeti.hypervisor import hv_kvm

#: What the test guest prints on its console when it has booted.
READY = b"gkvm-test-guest: ready"


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


def guest_hvparams():
  """The hypervisor parameters that boot the test guest (GKVM_GUEST_DIR),
  under TCG: this machine's nested KVM stalls a Linux guest (see README)."""
  guest = os.environ["GKVM_GUEST_DIR"]
  with open(os.path.join(guest, "cmdline")) as f:
    cmdline = f.read().replace("console=ttyS0", "").strip()
  return {constants.HV_KERNEL_PATH: os.path.join(guest, "vmlinux"),
          constants.HV_INITRD_PATH: os.path.join(guest, "initramfs.cpio.gz"),
          constants.HV_ROOT_PATH: "/dev/ram0",
          constants.HV_KERNEL_ARGS: cmdline,
          constants.HV_SERIAL_SPEED: 115200,
          constants.HV_KVM_FLAG: constants.HT_KVM_DISABLED}


def proc_stat(pid):
  """The fields of /proc/PID/stat after the command name (state first,
  then the parent's pid), or None when the process is gone."""
  try:
    with open("/proc/%d/stat" % pid) as f:
      return f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None


def wait_pid_gone(pid, timeout=10):
  """Waits until `pid` has exited (a zombie counts: this machine's init
  reaps orphans slowly)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    fields = proc_stat(pid)
    if fields is None or fields[0] == "Z":
      return
    time.sleep(0.02)
  raise AssertionError("process %d never exited" % pid)


class Serial(object):
  """The guest's serial console socket."""

  def __init__(self, path, timeout=10):
    deadline = time.time() + timeout
    while True:
      try:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        break
      except OSError:
        if time.time() > deadline:
          raise
        time.sleep(0.05)
    self.buf = b""

  def wait_for(self, text, timeout=90):
    """Waits for `text`; returns what came before it (and drops both)."""
    deadline = time.time() + timeout
    while text not in self.buf:
      self.sock.settimeout(max(0.1, deadline - time.time()))
      try:
        chunk = self.sock.recv(4096)
      except socket.timeout:
        chunk = b""
      if not chunk and time.time() > deadline:
        raise AssertionError("no %r on the console; it said: %r" %
                             (text, self.buf[-2000:]))
      self.buf += chunk
    at = self.buf.index(text)
    before, self.buf = self.buf[:at], self.buf[at + len(text):]
    return before

  def answer(self, timeout=90):
    """Waits until the guest's shell answers (its boot may be over, or not
    yet: what it printed before this connection is gone)."""
    deadline = time.time() + timeout
    n = 0
    while True:
      n += 1
      try:
        return self.run("echo up", "up%d" % n, timeout=2)
      except AssertionError:
        if time.time() > deadline:
          raise

  def run(self, command, marker, timeout=30):
    """Runs a shell command in the guest; returns its output."""
    self.sock.sendall(command.encode() + b"; echo " + marker.encode() +
                      b"-$((6*7))\n")
    return self.wait_for(("%s-42" % marker).encode(), timeout)

  def close(self):
    self.sock.close()
