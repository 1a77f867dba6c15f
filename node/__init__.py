"""pacsnode: everything one node does on its own (DICOM SCP, repository, index, CLI)."""



def __getattr__(name: str) -> str:
    """`node.__version__`: the installed distribution's version, looked up when asked."""
    if name == "__version__":
        from node.implementation import version

        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
