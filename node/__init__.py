"""pacsnode: everything one node does on its own (DICOM SCP, repository, index, CLI)."""

__version__ = "0.1.0"
