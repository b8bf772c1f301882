"""Training, one concept a module (no Ray in here): where the data is (``splits``), the
examples of each stage (``data``), guidance jitter (``guidance``), augmentation
(``augment``), the data-loading stages as batch callables (``ingest``), the steps
(``steps``) and checkpoints (``checkpoint``)."""
