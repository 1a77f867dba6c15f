"""The process model of a serving node: the main process starts `dicom.association_processes`
other processes (`supervisor`), hands each a share of the connections over a channel
(`channel`), and each serves them (`association`, run as `python -m`) with the server that
node/serving.py assembles; `tuning`: process-wide settings of every serving process.
Thread placement on CPUs (node/affinity.py) sits lower: the DUL and directory-sync threads
use it."""
