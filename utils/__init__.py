"""What every layer shares, each job written once: the command-line convention, user errors and the ``--device``
rule (``utils.cli``), outputs written whole or not at all (``utils.files``: ``atomic_write``, ``write_json``,
``atomic_dir``), and the feature vectors' L2 normalisation and top-k (``utils.vectors``).

A leaf package: it imports no other package of this project, and every package (``models``, ``prepare``, the
converter ``matconvnet``, ``engine``, the entry points) may import it. ``cli`` and ``files`` use the standard
library only (entry points import them before torch); ``vectors`` needs numpy and torch.
"""
