# Licensed under MIT OR Apache-2.0, like the rest of gkvm.
"""gkvm as Ganeti 3.1's KVM hypervisor (see `gkvm_ganeti.hypervisor`).

`import gkvm_ganeti.activate` (what the installed `.pth` file does) makes
Ganeti's hypervisor `kvm` this plugin's in every Python process that
imports `ganeti.hypervisor`; it imports nothing of Ganeti until then.
"""
