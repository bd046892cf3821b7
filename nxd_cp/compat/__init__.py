"""The only doors to private APIs: one module per library (``torch``, ``torch_xla``,
``transformers``, ``nxd``), each with the versions it was tested on and a clear error outside
them. Nothing else in nxd_cp touches a private name of those libraries."""
