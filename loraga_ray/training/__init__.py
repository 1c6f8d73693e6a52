"""What runs on a Ray Train worker: the model per ``--init`` (``build``), the training loop
(``loop``), evaluation (``evaluate``) and checkpoints and the deliverable (``checkpoints``); the
same loop inside a Tune trial's process for a single-worker CPU trial (``local``)."""
