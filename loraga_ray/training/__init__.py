"""What runs on a Ray Train worker: the model per ``--init`` (``build``), the training loop
(``loop``), evaluation (``evaluate``) and checkpoints and the deliverable (``checkpoints``)."""
