"""Training and evaluation over a prepared directory: the datasets and batches (``data``), the one training loop of
both stages (``loop``, ``step``, ``train_cli``, ``config``, ``dist``, ``checkpoint``, ``logging``), test-time encoding and
ranking (``encode``, ``metrics``, ``paper``, ``visualize``) and rebuilding a trained model (``model_io``). It knows
nothing of raw dataset formats and imports ``models``, ``prepare`` and ``utils`` only. The training step itself,
sync-free and optionally captured as a CUDA graph, is ``step``. Search and the browser, built on top of it, are the
``retrieval`` package.
"""
