"""The DICOM SCP: association admission, presentation contexts, C-ECHO and C-STORE."""
