"""What every layer shares, and nothing else: the command-line convention and user errors (``utils.cli``).

A leaf package: it imports no other package of this project, and every package (``models``, ``prepare``, the
converter ``matconvnet``, ``engine``, the entry points) may import it.
"""
