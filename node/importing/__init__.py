"""`pacsnode import`: files, folders and DICOMDIR media taken in through the C-STORE path."""
