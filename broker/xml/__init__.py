"""Domain XML provisioning: make a libvirt domain console-ready."""
