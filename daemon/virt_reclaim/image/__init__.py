"""Image files on the host: qemu-img and its argv, temporary and backup files, QEMU lock guard."""
