"""fusedisk: serve a VM disk image through FUSE and live-move it to new storage."""

__version__ = "0.1.0"
