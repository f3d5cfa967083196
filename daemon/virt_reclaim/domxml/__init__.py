"""libvirt domain XML as pure functions: read, edit the persistent definition, block-job XML."""
