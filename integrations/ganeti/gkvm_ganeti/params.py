# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""gkvm's hypervisor parameters beyond Ganeti 3.1's 65
(`kvm_cmdline::GKVM_HVPARAMS`), and their registration with Ganeti.

Ganeti keeps its parameter tables in code (`ganeti.constants`:
`HVS_PARAMETERS`, `HVS_PARAMETER_TYPES`, `HVC_DEFAULTS`): every Python
process of the cluster checks `-H` values against them (the `gnt-*`
commands, the master daemon, the node daemons), and the Haskell daemons
keep hypervisor parameters as opaque dictionaries. `register` adds gkvm's
keys to those tables when `ganeti.constants` is loaded (`activate`), so
that `gnt-instance add/modify -H tpm=tpm2` and `gnt-cluster modify -H
kvm:rng=virtio` work on a cluster whose nodes all have the plugin. Imports
nothing of Ganeti.
"""

#: name -> (Ganeti's value type, default, allowed values or None).
GKVM_PARAMETERS = {
  "firmware": ("string", "bios", ("bios", "uefi", "uefi-secboot")),
  "rng": ("string", "none", ("none", "virtio")),
  "rng_rate": ("int", 1 << 20, None),
  "watchdog": ("string", "none", ("none", "i6300esb")),
  "watchdog_action": ("string", "reset",
                      ("reset", "shutdown", "poweroff", "pause", "none")),
  "tpm": ("string", "none", ("none", "tpm2")),
  "sandbox": ("string", "on", ("on", "off")),
  "cgroup_cpu_quota": ("int", 0, None),
  "cgroup_cpu_weight": ("int", 0, None),
  "cgroup_memory_max": ("int", 0, None),
  "cgroup_memory_high": ("int", 0, None),
  "cgroup_pids_max": ("int", 0, None),
  "cgroup_io_weight": ("int", 0, None),
  "cgroup_io_max": ("string", "", None),
}


def register(constants):
  """Adds gkvm's parameters to Ganeti's tables (idempotent)."""
  types = dict((k, t) for k, (t, _, _) in GKVM_PARAMETERS.items())
  constants.HVS_PARAMETER_TYPES.update(types)
  constants.HVS_PARAMETERS = frozenset(constants.HVS_PARAMETERS |
                                       frozenset(GKVM_PARAMETERS))
  kvm = constants.HVC_DEFAULTS.get(constants.HT_KVM)
  if kvm is not None:
    for key, (_, default, _) in GKVM_PARAMETERS.items():
      kvm.setdefault(key, default)


def check(hvparams):
  """Problems of gkvm's parameters in `hvparams` (absent ones take their
  defaults), one string each."""
  problems = []
  for key, (kind, _, allowed) in sorted(GKVM_PARAMETERS.items()):
    if key not in hvparams:
      continue
    value = hvparams[key]
    if kind == "int":
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append("Parameter '%s' must be a non-negative integer"
                        " (current value: '%s')" % (key, value))
    elif allowed is None:
      # Free text, which gkvm parses: ValidateParameters and the start
      # name a malformed one.
      if not isinstance(value, str):
        problems.append("Parameter '%s' must be a string (current value:"
                        " '%s')" % (key, value))
    elif value not in allowed:
      problems.append("Parameter '%s' must be one of %s (current value:"
                      " '%s')" % (key, ", ".join(allowed), value))
  return problems
