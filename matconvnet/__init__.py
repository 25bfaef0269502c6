"""The MatConvNet converter: the authors' released networks (``net-epoch-N.mat``) and MatConvNet's
``imagenet-resnet-50-dag.mat`` -> this project's checkpoints and caffe-style backbone files (docs/matconvnet.md).

``python -m matconvnet {backbone,model,inspect}`` (``__main__.py``, the command line) runs ``convert`` (the
conversion), which parses a file with ``dagnn`` (the DagNN as MatConvNet saves it, the checks of names, shapes,
geometry and wiring, and the mapping of each parameter to its tensor) against ``layout`` (the original networks,
layer by layer, named as in the authors' files and sized by ``models.spec``). The .mat reader is ``prepare.matfile``
(the preparers read the authors' dictionary with it too).

Sits above ``models`` (its spec) and ``prepare`` (the reader, the dictionary, the prepared manifest); nothing but the
tests and the docs use it, and it imports neither ``engine`` nor the entry points.
"""
