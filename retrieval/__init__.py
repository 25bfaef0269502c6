"""Search and the retrieval browser over a trained model: your own sentence -> images of a folder, an image ->
captions of a prepared split (``search``, ``python -m retrieval.search``; building blocks in ``index``), and a local web
page to query a model and inspect its rankings (``browse``, ``browse_app``, ``browse_index``, ``browse_limits``,
``browse_static/``; ``python -m retrieval.browse``), with the feature caches both keep (``cache``). It sits on top of
``engine`` (rebuilding a trained model, test-time encoding, metrics) and nothing in ``engine`` imports it.
"""
