"""dingyuan: block-level disaster recovery and continuous data protection."""

__version__ = "0.1.0"
