"""Everything that touches a library's private internals (pynetdicom, pydicom, psycopg): the
only package allowed to; README.md here lists each name relied on and what breaks if it goes."""
