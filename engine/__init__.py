"""Training and evaluation over a prepared directory: the datasets and batches (``data``), the one training loop of
both stages (``loop``, ``train_cli``, ``config``, ``dist``, ``checkpoint``, ``logging``), test-time encoding and
ranking (``encode``, ``metrics``, ``paper``, ``visualize``) and rebuilding a trained model (``model_io``). It knows
nothing of raw dataset formats and imports ``models``, ``prepare`` and ``utils`` only. For now it also holds search
and the retrieval browser (``search``, ``search_index``, ``browse*``), which are to move to a package of their own.
"""
