# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""gkvm as Ganeti 3.1's KVM hypervisor: the hypervisor class.

`GkvmHypervisor` implements Ganeti's hypervisor interface
(`ganeti.hypervisor.hv_base.BaseHypervisor`) through gkvm's typed API
(`docs/API.md`, `schemas/v1/api.json`: one JSON request of the facade's
own types, answered by JSON reply lines whose errors carry a `kind`). It
maps Ganeti's objects (instance, beparams, hvparams, NICs with their
nicparams and network, disks with their access mode and URIs, tags, uuid,
network port) onto gkvm's instance definition, and gkvm's answers back
onto what Ganeti expects. It uses Ganeti's own run directory layout
(`/var/run/ganeti/kvm-hypervisor`), so instances started by Ganeti's KVM
driver are adopted as they run. Three calls stay on the command line
(`--json`, `schemas/v1`), for what only the CLI composes: `verify` (the
node's problems, the parameters' and Ganeti's warnings in one document),
`accept` (the destination's node-local settings and its trust of
Ganeti's RPC are node configuration, not a request) and
`powercycle-node --confirm`.

Why gkvm's process and not bindings of the facade: it keeps Ganeti's
Python process free of a native extension that would have to match its
interpreter. Its cost is a process start per call (about 4 ms for an
`info` here, more than Ganeti's own driver's 3 ms of QMP): so calls go to
`gkvm serve`, a fork server that answers without a process start (see
`Gkvm` and README, "Using gkvm from Ganeti").
"""

import errno
import json
import os
import socket
import subprocess
import tempfile

from ganeti import constants
from ganeti import errors
from ganeti import objects
from ganeti import pathutils
from ganeti.hypervisor import hv_base
from ganeti.hypervisor import hv_kvm

from gkvm_ganeti import params as gkvm_params

#: The gkvm JSON interface this plugin speaks (`schemas/v1`), and the gkvm
#: versions that have it.
INTERFACE = 1
SUPPORTED_MAJOR_MINOR = ((0, 1),)

#: Hypervisor parameters a migration info may not choose on the
#: destination (gkvm's `hv_kvm::trust::NODE_LOCAL_HVPARAMS`): the
#: destination takes them from the cluster's configuration.
NODE_LOCAL = ("kvm_path", "kvm_extra", "vnc_password_file",
              "spice_password_file", "vnc_x509_path", "use_chroot",
              "security_model", "security_domain", "mem_path")

#: Ganeti's KVM run directory: gkvm manages it in the same layout.
RUN_DIR = "/var/run/ganeti/kvm-hypervisor"
# The cluster's settings for gkvm (see _node_config).
NODE_CONFIG = os.path.join(pathutils.CONF_DIR, "gkvm-node.toml")


class GkvmError(errors.HypervisorError):
  """gkvm failed; the message is gkvm's (naming the instance, parameter or
  path), `kind` its error kind (schemas/v1/error.json; None when gkvm
  gave no JSON error)."""

  def __init__(self, message, kind=None):
    errors.HypervisorError.__init__(self, message)
    self.kind = kind


class Unanswered(GkvmError):
  """gkvm's server closed the call without an answer: what ran it died (a
  call that only reads may be repeated)."""


#: The API's requests that only read (`Request::only_reads`): repeated once
#: when the server closes one unanswered.
READ_ONLY_OPS = frozenset(["list", "overview", "info", "node_info", "stats",
                           "console", "hotplug_supported", "migration_status",
                           "validate_params", "plan", "capabilities"])


def _gkvm_binary():
  return os.environ.get("GKVM_BIN", "gkvm")


def _run_dir():
  return os.environ.get("GKVM_RUN_DIR", RUN_DIR)


def _check_version(binary, version=None):
  """Refuses a gkvm whose JSON interface is not this plugin's. `version` is
  what gkvm's server said it is; without it, `gkvm --version` is asked."""
  if version is None:
    try:
      out = subprocess.run([binary, "--version"], capture_output=True,
                           text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
      raise GkvmError("gkvm (%s) cannot be run: %s" % (binary, err))
    words = out.split()
    version = words[1] if len(words) > 1 else out.strip()
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    raise GkvmError("gkvm (%s) gave an unexpected version: %r" %
                    (binary, version))
  if (major, minor) not in SUPPORTED_MAJOR_MINOR:
    raise GkvmError(
      "gkvm %s.%s does not speak this plugin's JSON interface v%d (it"
      " needs gkvm %s); install matching versions of gkvm and its Ganeti"
      " plugin" % (major, minor, INTERFACE,
                   " or ".join("%d.%d" % v for v in SUPPORTED_MAJOR_MINOR)))
  return (major, minor)


#: How long gkvm's server waits for a call before it exits (seconds). Set
#: GKVM_PLUGIN_SERVE=0 in the environment to run the binary for every call.
SERVE_IDLE_EXIT = 300


#: The environment gkvm reads (its options' variables, its log filter).
_GKVM_ENV = ("GKVM_RUN_DIR", "GKVM_NODE_CONFIG", "GKVM_KVM_PATH",
             "GKVM_MIGRATION_KEY", "GKVM_LOG", "NO_COLOR")


#: How long a call to gkvm's server may take to connect and send (s).
SERVE_SEND_TIMEOUT = 10

#: How long a served call may take to answer (s): longer than any of
#: gkvm's own bounds (a stop's shutdown timeout, a start's), so it ends
#: only a call that can no longer be answered.
SERVE_ANSWER_TIMEOUT = 900


#: gkvm's own node configuration: when it exists, the administrator's
#: settings are gkvm's and the plugin writes none.
GKVM_NODE_CONFIG = "/etc/gkvm/node.toml"


def _cluster_settings():
  """What of this Ganeti node's configuration gkvm must use, as gkvm's
  node configuration (TOML lines): the cluster's uid pool (its first
  range; gkvm takes one), Ganeti's SPICE certificates, and Ganeti's own
  kvm-ifup as the NIC script where the site replaced Ganeti's networking
  with its kvm-vif-bridge hook (Ganeti's driver runs that hook through
  kvm-ifup; without it, gkvm configures NICs as kvm-ifup would), and the
  kvm-ifup-os that kvm-ifup runs for instance-communication TAPs."""
  lines = []
  try:
    from ganeti import ssconf
    from ganeti import uidpool
    pool = uidpool.ParseUidPool(ssconf.SimpleStore().GetUidPool(),
                                separator="\n")
  except Exception:  # pylint: disable=W0703
    pool = []  # no cluster configuration here (yet): no pool
  # gkvm refuses a pool that covers system accounts (Debian's first user
  # uid is 1000): such ranges of the cluster's pool are left out.
  pool = [(lo, hi) for lo, hi in sorted(pool) if lo >= 1000]
  if pool:
    lo, hi = pool[0]
    lines.append('uid_pool = "%d-%d"' % (lo, hi))
  if os.path.isfile(pathutils.SPICE_CERT_FILE):
    lines.append('spice_cert = "%s"' % pathutils.SPICE_CERT_FILE)
  if os.path.isfile(pathutils.SPICE_CACERT_FILE):
    lines.append('spice_cacert = "%s"' % pathutils.SPICE_CACERT_FILE)
  hook = os.path.join(pathutils.CONF_DIR, "kvm-vif-bridge")
  if os.access(hook, os.X_OK) and os.access(pathutils.KVM_IFUP, os.X_OK):
    lines.append('nic_up_script = "%s"' % pathutils.KVM_IFUP)
  # What Ganeti's kvm-ifup runs for an instance-communication TAP.
  ifup_os = os.path.join(pathutils.CONF_DIR, "kvm-ifup-os")
  if os.access(ifup_os, os.X_OK):
    lines.append('nic_communication_script = "%s"' % ifup_os)
  return lines


def _node_config():
  """The gkvm node configuration file that carries the cluster's settings
  (`/etc/ganeti/gkvm-node.toml`, rewritten when they change), or None when
  there is nothing to carry or the node has gkvm's own file.

  It names programs gkvm runs as root, so gkvm takes it only from a
  directory that only root may change: Ganeti's run directory is under
  /run/ganeti, which belongs to Ganeti's daemons' user. Only root writes
  it (the master's job processes, which assess parameters, run as that
  user: they use the file as root wrote it)."""
  if os.environ.get("GKVM_NODE_CONFIG") or os.path.exists(GKVM_NODE_CONFIG):
    return None
  lines = _cluster_settings()
  if not lines:
    return None
  path = NODE_CONFIG
  text = "# Written by gkvm's Ganeti plugin from the cluster's settings.\n" + \
    "\n".join(lines) + "\n"
  try:
    with open(path) as f:
      if f.read() == text:
        return path
  except OSError:
    pass
  if os.geteuid() != 0 or not os.path.isdir(os.path.dirname(path)):
    return path if os.path.exists(path) else None
  tmp = "%s.%d.tmp" % (path, os.getpid())
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
               0o644)
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.rename(tmp, path)
  return path


class Gkvm(object):
  """gkvm: `api` (a typed request, its reply lines) and `call` (a command
  line, its JSON document).

  Calls go to `gkvm serve` (a fork server on `RUN_DIR/gkvm-serve.sock`,
  started on first use, exiting after SERVE_IDLE_EXIT s idle): the same
  answer without starting a process per call, within a deadline. Without
  a server (it could not start, it retired for an upgrade or another run
  directory, a call with a timeout) the binary runs as usual.

  """

  _checked = {}

  def __init__(self, binary=None, run_dir=None):
    self.binary = binary or _gkvm_binary()
    self.run_dir = run_dir or _run_dir()

  def _node_settings(self):
    """This node's run directory and gkvm configuration file (or None)."""
    return self.run_dir, _node_config()

  def _node_options(self):
    """gkvm's options naming this node's run directory and configuration."""
    run_dir, config = self._node_settings()
    extra = ["--node-config", config] if config else []
    return ["--run-dir", run_dir] + extra

  def argv(self, args):
    return [self.binary] + self._node_options() + ["--json", "-q"] + args

  def socket_path(self):
    return os.path.join(self.run_dir, "gkvm-serve.sock")

  def _exchange(self, call, what, node=None):
    """Sends one call to gkvm's server; all it answered (bytes), or None
    when no server took the call (nothing ran: run the binary). A call
    the server took and lost raises GkvmError (it may have run in part,
    as a killed gkvm process; it is not run again)."""
    if os.environ.get("GKVM_PLUGIN_SERVE", "1") == "0":
      return None
    # A gkvm of another interface runs nothing, and says so.
    call["versions"] = ["%d.%d" % v for v in SUPPORTED_MAJOR_MINOR]
    call["env"] = dict((k, os.environ[k]) for k in _GKVM_ENV
                       if k in os.environ)
    if node is not None:
      # A typed request has no command line: this node's run directory
      # and configuration travel as the variables that name them.
      run_dir, config = node
      call["env"]["GKVM_RUN_DIR"] = run_dir
      call["env"].pop("GKVM_NODE_CONFIG", None)
      if config:
        call["env"]["GKVM_NODE_CONFIG"] = config
    data = (json.dumps(call) + "\n").encode()
    for attempt in (0, 1):
      sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
      sock.settimeout(SERVE_SEND_TIMEOUT)
      try:
        try:
          sock.connect(self.socket_path())
        except OSError as err:
          if attempt == 0 and err.errno in (errno.ENOENT, errno.ECONNREFUSED):
            if self._start_server():
              continue
          return None
        try:
          sock.sendall(data)
        except OSError:
          # The server went away before taking the call: nothing ran.
          return None
        chunks = []
        sock.settimeout(SERVE_ANSWER_TIMEOUT)
        try:
          while True:
            chunk = sock.recv(65536)
            if not chunk:
              break
            chunks.append(chunk)
        except socket.timeout:
          raise GkvmError("gkvm %s: gkvm's server (%s) did not answer within"
                          " %d s; the call may still be running" %
                          (what, self.socket_path(), SERVE_ANSWER_TIMEOUT))
        except OSError as err:
          chunks = [str(err).encode()]
      finally:
        sock.close()
      answer = b"".join(chunks)
      if not answer.endswith(b"\n"):
        raise Unanswered("gkvm %s: gkvm's server (%s) ended the call without"
                        " an answer (%s)" %
                        (what, self.socket_path(),
                         answer.decode(errors="replace") or
                         "connection closed"))
      last = answer.rstrip(b"\n").rsplit(b"\n", 1)[-1]
      try:
        if json.loads(last).get("retired") is True:
          # Retired (an upgraded binary, idle, another run directory):
          # nothing ran; run the binary.
          return None
      except (ValueError, AttributeError):
        raise GkvmError("gkvm's server (%s) answered garbage: %r" %
                        (self.socket_path(), answer[:200]))
      return answer
    return None

  def _served(self, args, stdin):
    """A command line's answer through gkvm's server, or None to run the
    binary."""
    call = {"argv": self.argv(args)[1:], "stdin": stdin}
    try:
      call["cwd"] = os.getcwd()
    except OSError:
      pass
    line = self._exchange(call, " ".join(args))
    if line is None:
      return None
    try:
      doc = json.loads(line)
      answer = subprocess.CompletedProcess(
        args, int(doc["code"]), doc["stdout"], doc["stderr"])
      version = str(doc["version"])
    except (ValueError, KeyError, TypeError, AttributeError):
      raise GkvmError("gkvm's server (%s) answered garbage: %r" %
                      (self.socket_path(), line[:200]))
    key = (self.binary, version)
    if key not in Gkvm._checked:
      Gkvm._checked[key] = _check_version(self.binary, version)
    return answer

  def api(self, request, timeout=None):
    """One request of gkvm's typed API (docs/API.md, e.g. {"op": "info",
    "instances": [NAME]}): the response's value (None for `done`). An
    error raises GkvmError with gkvm's message and kind."""
    what = request.get("op", "api")
    answer = None
    if timeout is None:
      try:
        answer = self._exchange({"request": request}, what,
                                node=self._node_settings())
      except Unanswered:
        if what not in READ_ONLY_OPS:
          raise
        answer = self._exchange({"request": request}, what,
                                node=self._node_settings())
    if answer is None:
      if self.binary not in Gkvm._checked:
        Gkvm._checked[self.binary] = _check_version(self.binary)
      try:
        proc = subprocess.run(
          [self.binary] + self._node_options() + ["-q", "api"],
          input=json.dumps(request), capture_output=True, text=True,
          timeout=timeout)
      except subprocess.TimeoutExpired:
        raise GkvmError("gkvm %s: no answer within %s s" % (what, timeout))
      except OSError as err:
        raise GkvmError("gkvm cannot be run: %s" % err)
      answer = proc.stdout.encode()
      if not answer.strip():
        raise GkvmError(*self._message(proc, [what]))
    return self._api_value(what, answer)

  def _api_value(self, what, answer):
    """The value of the API's reply lines `answer` (progress skipped)."""
    for line in reversed(answer.decode(errors="replace").splitlines()):
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
      except ValueError:
        break
      if not isinstance(doc, dict) or "progress" in doc:
        continue
      if "response" in doc:
        return doc["response"].get("value")
      if "error" in doc:
        err = doc["error"]
        raise GkvmError("gkvm %s: %s" % (what, err.get("message")),
                        err.get("kind"))
      if "code" in doc:
        # The server refused the call before running it (another
        # interface version, a malformed call): its error as the CLI's.
        proc = subprocess.CompletedProcess([what], int(doc["code"]),
                                           doc.get("stdout", ""),
                                           doc.get("stderr", ""))
        raise GkvmError(*self._message(proc, [what]))
      break
    raise GkvmError("gkvm %s: no answer in %r" % (what, answer[:200]))

  def _start_server(self):
    if not os.path.isdir(self.run_dir):
      return False
    try:
      # The server's run directory and node configuration are those of
      # every call it serves (a call naming others retires it).
      proc = subprocess.run(
        [self.binary] + self._node_options() +
        ["-q", "serve", "--socket", self.socket_path(),
         "--idle-exit", str(SERVE_IDLE_EXIT), "--detach"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
      return False
    return proc.returncode == 0

  def call(self, args, stdin=None, timeout=None, ok_codes=(0,), raw=False):
    """Runs gkvm; returns its JSON answer (None when it printed nothing),
    or its output as text with `raw`.

    A failure raises L{GkvmError} with gkvm's own message.

    """
    proc = self._served(args, stdin) if timeout is None else None
    if proc is None:
      if self.binary not in Gkvm._checked:
        Gkvm._checked[self.binary] = _check_version(self.binary)
      try:
        proc = subprocess.run(self.argv(args), input=stdin,
                              capture_output=True, text=True,
                              timeout=timeout)
      except subprocess.TimeoutExpired:
        raise GkvmError("gkvm %s: no answer within %s s" %
                        (" ".join(args), timeout))
      except OSError as err:
        raise GkvmError("gkvm cannot be run: %s" % err)
    if proc.returncode not in ok_codes:
      raise GkvmError(*self._message(proc, args))
    text = proc.stdout.strip()
    if raw:
      return text
    if not text:
      return None
    try:
      return json.loads(text)
    except ValueError:
      # JSON Lines (migrate): the last document is the outcome.
      return [json.loads(line) for line in text.splitlines() if line.strip()]

  @staticmethod
  def _message(proc, args):
    """gkvm's error as (message, kind)."""
    err = proc.stderr.strip()
    for line in reversed(err.splitlines()):
      try:
        doc = json.loads(line)
      except ValueError:
        continue
      if isinstance(doc, dict) and "message" in doc:
        return ("gkvm %s: %s" % (args[0], doc["message"]), doc.get("kind"))
    return ("gkvm %s failed (exit %s): %s" % (args[0], proc.returncode,
                                              err or "no message"), None)


#: The TAP names of instance-communication NICs (Ganeti's GenerateTapName
#: makes gnt.com.N; the kernel picks N here, atomically).
COMMUNICATION_TAP_TEMPLATE = "gnt.com.%d"


def _nic(nic):
  """A Ganeti NIC (nicparams filled) as a gkvm NIC."""
  params = nic.nicparams or {}
  out = {
    "mac": nic.mac,
    "mode": params.get(constants.NIC_MODE, constants.NIC_MODE_BRIDGED),
    "link": params.get(constants.NIC_LINK, "") or "",
  }
  if nic.ip:
    out["ip"] = nic.ip
  vlan = params.get(constants.NIC_VLAN)
  if vlan:
    out["vlan"] = vlan
  if nic.uuid:
    out["uuid"] = nic.uuid
  if nic.name:
    out["name"] = nic.name
    if nic.name.startswith(constants.INSTANCE_COMMUNICATION_NIC_PREFIX):
      # Ganeti 3.1's instance communication: its TAP is gnt.com.N, which
      # its kvm-ifup (and gkvm natively) configure with kvm-ifup-os.
      out["tap_template"] = COMMUNICATION_TAP_TEMPLATE
  netinfo = getattr(nic, "netinfo", None)
  if netinfo:
    net = {"name": netinfo.get("name") or nic.network or ""}
    for key in ("uuid", "subnet", "gateway", "subnet6", "gateway6",
                "mac_prefix", "network_type"):
      if netinfo.get(key):
        net[key] = netinfo[key]
    if netinfo.get("tags"):
      net["tags"] = list(netinfo["tags"])
    out["network"] = net
  return out


def _disk(block_device):
  """One of Ganeti's block_devices, (disk, link, uri), as a gkvm disk."""
  disk, link, uri = (tuple(block_device) + (None, None))[:3]
  out = {
    "mode": "ro" if disk.mode == constants.DISK_RDONLY else "rw",
    "template": disk.dev_type,
  }
  access = (disk.params or {}).get(constants.LDP_ACCESS)
  if uri and access == constants.DISK_USERSPACE:
    out["uri"] = uri
  else:
    out["path"] = link
  if disk.uuid:
    out["uuid"] = disk.uuid
  if disk.name:
    out["name"] = disk.name
  return out


class GkvmHypervisor(hv_base.BaseHypervisor):
  """Ganeti's KVM hypervisor, carried out by gkvm."""

  # The same parameters, checks and files as Ganeti's KVM driver (a
  # cluster's configuration is valid for both), and gkvm's own
  # (`gkvm_ganeti.params`, registered with Ganeti's tables too).
  PARAMETERS = dict(hv_kvm.KVMHypervisor.PARAMETERS)
  # A free-text one (cgroup_io_max) is gkvm's to parse: ValidateParameters
  # asks it.
  PARAMETERS.update(
    (key, hv_base.OPT_NONNEGATIVE_INT_CHECK if kind == "int" else
     hv_base.NO_CHECK if allowed is None else
     hv_base.ParamInSet(False, frozenset(allowed)))
    for key, (kind, _, allowed) in gkvm_params.GKVM_PARAMETERS.items())
  ANCILLARY_FILES = hv_kvm.KVMHypervisor.ANCILLARY_FILES
  ANCILLARY_FILES_OPT = hv_kvm.KVMHypervisor.ANCILLARY_FILES_OPT
  CAN_MIGRATE = True
  # Where Ganeti links each instance's disks on a node (its backend's
  # _GetBlockDevSymlinkPath).
  disk_links_dir = pathutils.DISK_LINKS_DIR

  def __init__(self):
    hv_base.BaseHypervisor.__init__(self)
    self.gkvm = Gkvm()

  # -- the instance definition ---------------------------------------------

  def _spec(self, instance, block_devices, startup_memory=None):
    be = instance.beparams
    spec = {
      "name": instance.name,
      "memory": be[constants.BE_MAXMEM],
      "vcpus": be[constants.BE_VCPUS],
      "tags": sorted(instance.GetTags()),
      "hvparams": dict(instance.hvparams),
      "nics": [_nic(n) for n in instance.nics],
      "disks": [_disk(d) for d in (block_devices or [])],
    }
    if instance.uuid:
      spec["uuid"] = instance.uuid
    if startup_memory is not None and startup_memory != spec["memory"]:
      spec["startup_memory"] = startup_memory
    port = instance.network_port
    if port is not None:
      spec["network_port"] = port
    return spec

  def _with_spec_file(self, spec, fn):
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="gkvm-",
                                     delete=True) as f:
      json.dump(spec, f)
      f.flush()
      return fn(f.name)

  # -- lifecycle -------------------------------------------------------------

  def StartInstance(self, instance, block_devices, startup_paused):
    spec = self._spec(instance, block_devices,
                      self._InstanceStartupMemory(instance))
    self.gkvm.api({"op": "start", "spec": spec,
                   "mode": "paused" if startup_paused else "running"})

  def StopInstance(self, instance, force=False, retry=False, name=None,
                   timeout=None):
    if name is not None and not force:
      raise errors.HypervisorError("Cannot shutdown cleanly by name only")
    name = name or instance.name
    if force:
      mode = {"kind": "force"}
    else:
      # Press the power button and return, as Ganeti's driver does: the
      # caller polls and forces after its own timeout.
      mode = {"kind": "acpi", "timeout_secs": 0}
    self.gkvm.api({"op": "stop", "instance": name, "mode": mode})

  def CleanupInstance(self, instance_name):
    self.gkvm.api({"op": "cleanup", "instance": instance_name})

  def RebootInstance(self, instance):
    # The current configuration: a restart (reboot_behavior=exit) takes
    # what may change from it, the hardware from the running instance.
    spec = self._spec(instance, [])
    self.gkvm.api({"op": "reboot", "instance": instance.name,
                   "config": spec["hvparams"]})

  def BalloonInstanceMemory(self, instance, mem):
    self.gkvm.api({"op": "balloon", "instance": instance.name, "mib": mem})

  # -- queries ---------------------------------------------------------------

  @staticmethod
  def _info_tuple(doc):
    """gkvm's info of one instance as Ganeti's (name, id, memory, vcpus,
    state, times), or None when it does not run."""
    state = doc.get("state")
    pid = doc.get("pid", 0)
    if state == "shutdown":
      # With user_shutdown, gkvm says whether the guest (or a signal on the
      # host) ended it, not an administrator's power button: Ganeti's
      # USER_down, as its kvmd decides. Otherwise (a stop, a reboot under
      # reboot_behavior=exit to be started again) it is not running.
      if not doc.get("user_down"):
        return None
      if pid == 0:
        # QEMU is gone (a signal): as Ganeti's driver reports it.
        return (doc["name"], -1, 0, 0, hv_base.HvInstanceState.SHUTDOWN, 0)
      return (doc["name"], pid, doc.get("memory_mib", 0), doc.get("vcpus", 1),
              hv_base.HvInstanceState.SHUTDOWN, doc.get("cpu_time_secs", 0.0))
    if pid == 0 or state in ("starting", "incoming", "migrated"):
      return None
    return (doc["name"], pid, doc.get("memory_mib", 0), doc.get("vcpus", 1),
            hv_base.HvInstanceState.RUNNING, doc.get("cpu_time_secs", 0.0))

  def ListInstances(self, hvparams=None):
    # Instances with a QEMU here (as Ganeti's driver: a live pid).
    return [d["name"] for d in self.gkvm.api({"op": "overview"}) or []
            if (self._info_tuple(d) or (None, -1))[1] > 0]

  def GetInstanceInfo(self, instance_name, hvparams=None):
    try:
      docs = self.gkvm.api({"op": "info", "instances": [instance_name]})
    except GkvmError as err:
      # Not running here: Ganeti wants None.
      if err.kind == "not_running":
        return None
      raise
    for doc in docs or []:
      if doc.get("name") == instance_name:
        return self._info_tuple(doc)
    return None

  def GetAllInstancesInfo(self, hvparams=None):
    return [t for t in (self._info_tuple(d)
                        for d in self.gkvm.api({"op": "info",
                                                "instances": []}) or [])
            if t is not None]

  def GetNodeInfo(self, hvparams=None):
    result = self.GetLinuxNodeInfo()
    node = self.gkvm.api({"op": "node_info"}) or {}
    version = node.get("hv_version")
    if version:
      result[constants.HV_NODEINFO_KEY_VERSION] = tuple(version)
    return result

  @classmethod
  def GetInstanceConsole(cls, instance, primary_node, node_group,
                         hvparams, beparams):
    if hvparams[constants.HV_SERIAL_CONSOLE]:
      cmd = [_gkvm_binary(), "--run-dir", _run_dir(), "console",
             instance.name]
      ndparams = node_group.FillND(primary_node)
      return objects.InstanceConsole(instance=instance.name,
                                     kind=constants.CONS_SSH,
                                     host=primary_node.name,
                                     port=ndparams.get(constants.ND_SSH_PORT),
                                     user=constants.SSH_CONSOLE_USER,
                                     command=cmd)
    # VNC and SPICE: as Ganeti's driver says them (same ports, addresses).
    return hv_kvm.KVMHypervisor.GetInstanceConsole(
      instance, primary_node, node_group, hvparams, beparams)

  def Verify(self, hvparams=None):
    doc = self.gkvm.call(["verify"], ok_codes=(0, 1)) or {}
    problems = doc.get("problems") or []
    return self._FormatVerifyResults(problems)

  # -- migration ---------------------------------------------------------------

  @staticmethod
  def VersionsSafeForMigration(src, target):
    # As Ganeti's driver: the machine type travels with the instance, and
    # the destination refuses one its QEMU lacks, naming it.
    return True

  def MigrationInfo(self, instance):
    # In Ganeti's format with gkvm's own info inside: the destination may
    # still run Ganeti's own driver (a cluster switching node by node).
    return self.gkvm.api({"op": "migration_info", "instance": instance.name,
                          "for_ganeti": True})

  def _local_disks(self, instance):
    """The instance's disks as this node reaches them: the links Ganeti
    makes on every node that opens them (BlockdevOpen, before
    AcceptInstance), so that the migration info chooses no host file QEMU
    opens here. A userspace-access disk keeps the URI of the info (QEMU's
    network client opens it, no host file)."""
    out = []
    for idx, disk in enumerate(getattr(instance, "disks_info", None) or []):
      entry = _disk((disk, None, None))
      entry.pop("path", None)
      entry.pop("uri", None)
      if (disk.params or {}).get(constants.LDP_ACCESS) != constants.DISK_USERSPACE:
        entry["path"] = os.path.join(
          self.disk_links_dir,
          "%s%s%d" % (instance.name, constants.DISK_SEPARATOR, idx))
      out.append(entry)
    return out

  def AcceptInstance(self, instance, info, target):
    port = instance.hvparams[constants.HV_MIGRATION_PORT]
    current = self._spec(instance, [])
    current["disks"] = self._local_disks(instance)

    # This node's values of what the info may not choose are the
    # cluster's, which Ganeti hands over with the instance.
    node_local = self._hv_args(dict((k, v) for k, v in
                                    instance.hvparams.items()
                                    if k in NODE_LOCAL))

    def accept(info_file):
      # The info came from the source's node daemon over Ganeti's RPC,
      # which the cluster's certificate authenticates: no operator's hands
      # between the nodes, so no migration key is needed to trust it.
      return self._with_spec_file(current, lambda spec_file: self.gkvm.call(
        ["accept", info_file, "--listen", "%s:%s" % (target, port),
         "--no-wait", "--trust-unsealed", "--current", spec_file] +
        node_local))

    with tempfile.NamedTemporaryFile("w", suffix=".mig", prefix="gkvm-",
                                     delete=True) as f:
      f.write(info)
      f.flush()
      accept(f.name)

  def FinalizeMigrationDst(self, instance, info, success):
    self.gkvm.api({"op": "finalize_destination", "instance": instance.name,
                   "outcome": "completed" if success else "failed"})

  def MigrateInstance(self, cluster_name, instance, target, live):
    # gkvm follows the migration to its end (events, not Ganeti's 2 s
    # polls): a failure raises here, and the source still runs until
    # FinalizeMigrationSource.
    port = instance.hvparams[constants.HV_MIGRATION_PORT]
    self.gkvm.api({"op": "migrate_unfinalized", "instance": instance.name,
                   "target": target, "port": port,
                   "mode": "live" if live else "offline"})

  def FinalizeMigrationSource(self, instance, success, live):
    self.gkvm.api({"op": "finalize_source", "instance": instance.name,
                   "outcome": "completed" if success else "failed"})

  def GetMigrationStatus(self, instance):
    doc = self.gkvm.api({"op": "migration_status",
                         "instance": instance.name}) or {}
    status = objects.MigrationStatus(status=doc.get("status", "failed"))
    status.transferred_ram = doc.get("transferred_bytes", 0)
    status.total_ram = doc.get("total_bytes", 0)
    status.postcopy_status = (doc.get("status") == "postcopy-active") or None
    return status

  # -- hot plug ----------------------------------------------------------------

  @staticmethod
  def _device_id(dev_type, device):
    """The device's id in QEMU: gkvm derives it from the UUID exactly as
    Ganeti 3.1's driver does (up to the third '-')."""
    return "%s-%s" % (dev_type.lower(), device.uuid.rsplit("-", 2)[0])

  def HotplugSupported(self, instance):
    try:
      self.gkvm.api({"op": "hotplug_supported", "instance": instance.name})
    except GkvmError as err:
      raise errors.HotplugError(str(err))

  def VerifyHotplugSupport(self, instance, action, dev_type):
    # The device models Ganeti's driver can hot-plug, from the running
    # instance's parameters.
    hvp = instance.hvparams
    device_type = hv_kvm._DEVICE_TYPE[dev_type](hvp)
    if device_type not in hv_kvm._HOTPLUGGABLE_DEVICE_TYPES[dev_type]:
      raise errors.HypervisorError(
        "Hotplug is not supported for device type %s" % device_type)
    if action == constants.HOTPLUG_ACTION_MODIFY and \
        dev_type != constants.HOTPLUG_TARGET_NIC:
      raise errors.HotplugError("Only NICs can be modified while running")
    self.HotplugSupported(instance)

  def HotAddDevice(self, instance, dev_type, device, extra, seq):
    if dev_type == constants.HOTPLUG_TARGET_NIC:
      self.gkvm.api({"op": "nic_add", "instance": instance.name,
                     "nic": _nic(device)})
    elif dev_type == constants.HOTPLUG_TARGET_DISK:
      link, uri = (tuple(extra or ()) + (None, None))[:2]
      self.gkvm.api({"op": "disk_add", "instance": instance.name,
                     "disk": _disk((device, link, uri))})
    else:
      raise errors.HotplugError("Cannot hot-plug a %s" % dev_type)

  def HotDelDevice(self, instance, dev_type, device, extra, seq):
    op = {constants.HOTPLUG_TARGET_NIC: "nic_remove",
          constants.HOTPLUG_TARGET_DISK: "disk_remove"}.get(dev_type)
    if op is None:
      raise errors.HotplugError("Cannot hot-unplug a %s" % dev_type)
    self.gkvm.api({"op": op, "instance": instance.name,
                   "id": self._device_id(dev_type, device)})

  def HotModDevice(self, instance, dev_type, device, extra, seq):
    # A change of link or mode reconnects the same TAP: unlike Ganeti's
    # driver (unplug + plug), the guest does not see it. A new MAC is new
    # hardware: gkvm unplugs the NIC and plugs it again, as Ganeti does.
    if dev_type == constants.HOTPLUG_TARGET_NIC:
      self.gkvm.api({"op": "nic_modify", "instance": instance.name,
                     "id": self._device_id(dev_type, device),
                     "nic": _nic(device), "keep_mac": False})

  def ResizeDisk(self, instance, disk, new_size):
    # Ganeti's backend passes the new size in bytes (LUInstanceGrowDisk:
    # `self.target * (1024 ** 2)`), as its driver hands it to block_resize;
    # a disk object's own `size` is MiB.
    self.gkvm.api({"op": "disk_grow", "instance": instance.name,
                   "id": self._device_id(constants.HOTPLUG_TARGET_DISK, disk),
                   "bytes": int(new_size)})

  # -- parameters --------------------------------------------------------------

  @classmethod
  def CheckParameterSyntax(cls, hvparams):
    # Pure checks (run on the master): Ganeti's own, so that a cluster's
    # configuration is judged exactly as by its KVM driver; gkvm's own
    # parameters (absent from a configuration made before the plugin:
    # their defaults) by their tables.
    ganetis = dict((k, v) for k, v in hvparams.items()
                   if k not in gkvm_params.GKVM_PARAMETERS)
    hv_kvm.KVMHypervisor.CheckParameterSyntax(ganetis)
    problems = gkvm_params.check(hvparams)
    if problems:
      raise errors.HypervisorError("; ".join(problems))

  @staticmethod
  def _hv_args(hvparams):
    args = []
    for key, value in sorted(hvparams.items()):
      if value is None:
        continue
      if isinstance(value, bool):
        value = "true" if value else "false"
      args += ["-H", "%s=%s" % (key, value)]
    return args

  @classmethod
  def ValidateParameters(cls, hvparams):
    # Ganeti's own checks of the parameters' files first (kvm_path must be
    # an existing file, ...), as its KVM driver extends them.
    hv_base.BaseHypervisor.ValidateParameters.__func__(cls, hvparams)
    # Then gkvm's, against what this node has (the QEMU named and what it
    # supports, users, addresses, files): the parameters' own problems,
    # by parameter, not the node's (those are Verify's).
    doc = Gkvm().call(["verify"] + cls._hv_args(hvparams),
                      ok_codes=(0, 1)) or {}
    problems = ["%s: %s" % (p.get("key"), p.get("message"))
                for p in doc.get("invalid_params") or []]
    if problems:
      raise errors.HypervisorError("; ".join(problems))

  @classmethod
  def AssessParameters(cls, hvparams):
    doc = Gkvm().call(["verify"] + cls._hv_args(hvparams),
                      ok_codes=(0, 1)) or {}
    return list(doc.get("warnings") or [])

  @classmethod
  def PowercycleNode(cls, hvparams=None):
    Gkvm().call(["powercycle-node", "--confirm"])


def _register():
  """With the plugin installed (`gkvm_ganeti.activate` loaded), a process
  that imported this module before `ganeti.hypervisor` finished loading
  gets `kvm` mapped here, now that the class exists."""
  import sys
  if "gkvm_ganeti.activate" in sys.modules:
    sys.modules["ganeti.hypervisor"]._HYPERVISOR_MAP[constants.HT_KVM] = \
      GkvmHypervisor


_register()
