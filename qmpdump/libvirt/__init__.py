"""libvirt-managed domains as a source of VMs (the optional ``qmpdump[libvirt]`` extra).

* :mod:`qmpdump.libvirt.connection`: the connection and the domain, libvirt's errors in qmpdump's
  tree, libvirt's events on the asyncio loop (``libvirtaio``), QEMU's pid from libvirt.
* :mod:`qmpdump.libvirt.domxml`: pure; the memory a domain's XML describes.
* :mod:`qmpdump.libvirt.supported`: the supported path, without monitor passthrough: the map from
  the domain XML plus host facts, QEMU's own dump through ``virDomainCoreDumpWithFormat``.

The passthrough path (QMP through libvirt's monitor passthrough, behind the same session
interface as a QMP socket) lives with the other QMP code, in :mod:`qmpdump.qmp.passthrough`.
Only these modules import ``libvirt``; nothing else in qmpdump needs it installed.
"""
