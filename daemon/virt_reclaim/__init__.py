"""virt-reclaim: reclaim the free space of idle KVM guests' qcow2 disks."""

__version__ = "0.1.0"
