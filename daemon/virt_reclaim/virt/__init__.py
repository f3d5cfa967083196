"""The only package that imports libvirt; everything else uses the small interface it offers.

``connection`` holds the Hypervisor (the connection to libvirtd), ``domain`` one Domain,
``blockjobs`` the snapshots and block jobs of the live mode, ``events`` libvirt's event loop
thread and ``common`` what they share (importing any of them silences libvirt's own error
printing, once). ``agentreplies`` reads the agent's untrusted replies, pure; the XML of block
jobs is in ``domxml.blockjob``, the data types in ``model`` and the errors in ``errors``.
"""
