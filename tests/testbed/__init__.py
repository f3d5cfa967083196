"""The real libvirt + QEMU + guest agent test bed."""
