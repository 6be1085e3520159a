# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""gkvm's typed API through `gkvm serve`, as any client calls it (one
connection, one JSON request, the reply lines back), against Ganeti 3.1's
own KVMHypervisor called in process and against raw QMP, one run, with 10
and then 100 paused guest-less KVM instances (64 MiB) per side:

- info of one instance: `{"op": "info", "instances": [NAME]}` vs Ganeti's
  `GetInstanceInfo(NAME)` vs a bare QMP exchange on the instance's own
  socket (connect, greeting, `qmp_capabilities`, `query-status`);
- list of all: `{"op": "overview"}` (what `gkvm list` and the plugin's
  ListInstances ask) vs Ganeti's `ListInstances()`.

Paused, because guest-less firmware spins and 200 of them would time the
host's contention rather than the calls. Calls are interleaved so the
host's drift hits every side alike; each row is the median of its calls.
Run by `integrations/ganeti/run-tests --bench-api [GKVM_BINARY]` (give it a
release build).
"""

import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import gkvm_ganeti.activate  # noqa: F401
from ganeti import pathutils

from bench import instance
from tests.support import ganeti_driver

CALLS = int(os.environ.get("BENCH_API_CALLS", "200"))
#: The instance counts measured (a smoke run: BENCH_API_SIZES=2,3).
SIZES = [int(n) for n in os.environ.get("BENCH_API_SIZES", "10,100").split(",")]


def api_call(path, request):
  """One typed request over the server's socket; the last reply line."""
  s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  s.connect(path)
  s.sendall((json.dumps({"request": request}) + "\n").encode())
  chunks = []
  while True:
    chunk = s.recv(1 << 20)
    if not chunk:
      break
    chunks.append(chunk)
  s.close()
  last = json.loads(b"".join(chunks).splitlines()[-1])
  if "response" not in last:
    raise AssertionError("%s: %s" % (request, last))
  return last["response"].get("value")


def raw_qmp(path):
  """A bare QMP exchange: greeting, capabilities, query-status."""
  s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  s.connect(path)
  f = s.makefile("rwb")
  f.readline()
  f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
  f.flush()
  f.readline()
  line = f.readline()
  f.close()
  s.close()
  return json.loads(line)["return"]


def timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def ms(xs):
  return statistics.median(xs) * 1000


def main():
  gkvm = os.environ["GKVM_BIN"]
  tmp = tempfile.mkdtemp(prefix="gkvm-apibench-", dir="/tmp")
  run = os.path.join(tmp, "gkvm")
  os.makedirs(run)
  pathutils.LOG_KVM_DIR = os.path.join(tmp, "log")
  os.makedirs(pathutils.LOG_KVM_DIR)
  sock = os.path.join(run, "gkvm-serve.sock")
  server = subprocess.Popen([gkvm, "--run-dir", run, "-q", "serve",
                             "--socket", sock], stdin=subprocess.DEVNULL)
  ganeti = ganeti_driver(os.path.join(tmp, "ganeti"))
  started = {"gkvm": [], "ganeti": []}
  rows = []
  try:
    while not os.path.exists(sock):
      time.sleep(0.01)
    for total in SIZES:
      # Grow both sides to `total` paused instances.
      while len(started["gkvm"]) < total:
        n = len(started["gkvm"])
        inst = instance("api%03d" % n)
        spec = {"name": inst.name, "memory": 64, "hvparams": dict(inst.hvparams)}
        api_call(sock, {"op": "start", "spec": spec, "mode": "paused"})
        started["gkvm"].append(inst.name)
        ginst = instance("gan%03d" % n)
        ganeti().StartInstance(ginst, [], True)
        started["ganeti"].append(ginst)
      samples = {}
      for i in range(CALLS):
        name = started["gkvm"][i % total]
        gname = started["ganeti"][i % total].name
        qmp = os.path.join(run, "ctrl", name + ".qmp")
        for key, fn in (
            ("api info", lambda: api_call(sock, {"op": "info",
                                                 "instances": [name]})),
            ("ganeti GetInstanceInfo", lambda: ganeti().GetInstanceInfo(gname)),
            ("raw QMP query-status", lambda: raw_qmp(qmp)),
            ("api list (overview)", lambda: api_call(sock, {"op": "overview"})),
            ("ganeti ListInstances", lambda: ganeti().ListInstances()),
        ):
          samples.setdefault(key, []).append(timed(fn))
          gc.collect()
      listed = api_call(sock, {"op": "overview"})
      if len(listed) != total:
        raise AssertionError("overview lists %d, not %d" % (len(listed), total))
      for key, xs in samples.items():
        rows.append((total, key, ms(xs)))
  finally:
    for name in started["gkvm"]:
      try:
        api_call(sock, {"op": "stop", "instance": name,
                        "mode": {"kind": "force"}})
      except Exception as err:  # pylint: disable=W0703
        print("stop %s: %s" % (name, err), file=sys.stderr)
    for ginst in started["ganeti"]:
      try:
        ganeti().StopInstance(ginst, force=True)
        ganeti().CleanupInstance(ginst.name)
      except Exception as err:  # pylint: disable=W0703
        print("stop %s: %s" % (ginst.name, err), file=sys.stderr)
    server.terminate()
    server.wait()
    shutil.rmtree(tmp, ignore_errors=True)
  print("gkvm's API through gkvm serve vs Ganeti 3.1's driver in process vs"
        " raw QMP; paused guest-less KVM instances, median of %d calls" % CALLS)
  print("%-10s %-26s %10s" % ("instances", "call", "median"))
  for total, key, value in rows:
    print("%-10d %-26s %7.2f ms" % (total, key, value))
  by = dict(((t, k), v) for t, k, v in rows)
  for total in SIZES:
    info = by[(total, "api info")]
    print("%d instances: api info %.2f ms = %.2fx Ganeti's GetInstanceInfo,"
          " %.2fx raw QMP; api list %.2f ms = %.2fx Ganeti's ListInstances" %
          (total, info, info / by[(total, "ganeti GetInstanceInfo")],
           info / by[(total, "raw QMP query-status")],
           by[(total, "api list (overview)")],
           by[(total, "api list (overview)")] /
           by[(total, "ganeti ListInstances")]))


if __name__ == "__main__":
  main()
