# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""Makes Ganeti's hypervisor `kvm` gkvm's.

Imported at interpreter start by the `.pth` file `integrations/ganeti/install`
writes: it costs nothing to a process that never imports Ganeti. When
`ganeti.hypervisor` is imported, its map of hypervisor classes gets
`GkvmHypervisor` for `kvm`; when `ganeti.constants` is, its parameter
tables get gkvm's own parameters (`gkvm_ganeti.params`). Removing the
`.pth` file undoes it.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "ganeti.hypervisor"
_CONSTANTS = "ganeti.constants"


def _patch_constants(module):
  from gkvm_ganeti import params
  params.register(module)


def _patch(module):
  own = sys.modules.get("gkvm_ganeti.hypervisor")
  if own is not None and not hasattr(own, "GkvmHypervisor"):
    # The plugin's module is importing `ganeti.hypervisor` itself; it
    # registers its class when it is done (`hypervisor._register`).
    return
  from ganeti import constants
  from gkvm_ganeti.hypervisor import GkvmHypervisor
  module._HYPERVISOR_MAP[constants.HT_KVM] = GkvmHypervisor


class _Finder(importlib.abc.MetaPathFinder):
  """Finds `ganeti.hypervisor` and `ganeti.constants` as usual, and
  patches each once loaded."""

  def find_spec(self, name, path, target=None):
    if name not in (_TARGET, _CONSTANTS):
      return None
    sys.meta_path.remove(self)
    try:
      spec = importlib.util.find_spec(name)
    finally:
      sys.meta_path.insert(0, self)
    if spec is None or spec.loader is None:
      return spec
    loader = spec.loader
    original = loader.exec_module

    patch = _patch if name == _TARGET else _patch_constants

    def exec_module(module):
      original(module)
      patch(module)

    loader.exec_module = exec_module
    return spec


def install():
  if _CONSTANTS in sys.modules:
    _patch_constants(sys.modules[_CONSTANTS])
  if _TARGET in sys.modules:
    _patch(sys.modules[_TARGET])
  if (_TARGET not in sys.modules or _CONSTANTS not in sys.modules) and \
      not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())


install()
