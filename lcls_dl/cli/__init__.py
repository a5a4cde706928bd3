"""The ``lcls-dl`` command line: thin click commands over the lcls_dl library."""
