"""What talks to Ray, one module per job and its parts:

* ``cluster`` (connecting: an embedded local Ray, or a cluster) and ``resources`` (what each
  worker reserves, checked against the cluster);
* ``init`` (``loraga-ray init``: the distributed gradient estimate), with ``init_data`` (read,
  sample, tokenise, stream) and ``gradient_worker`` (the actors and their stream);
* ``train`` (``loraga-ray train``: one Ray Train run), with ``run_plan`` (data, length, checks)
  and ``run_folder`` (the output folder, resume, export);
* ``search`` (``loraga-ray tune``: Ray Tune over Ray Train trials, or for one CPU worker the same
  loop inside each trial, one shared estimate), with ``search_trial`` (one trial) and
  ``search_results`` (tables, best trial);
* ``demo`` (``loraga-ray demo``).
"""
