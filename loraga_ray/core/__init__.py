"""The maths and the artifact, importable with no Ray: which layers are targets (``targets``),
the float32 gradient sums (``gradients``), the truncated SVD and LoRA-GA factors (``factors``),
the single-process estimate (``estimate``), the init artifact and where it is stored
(``artifact``, ``storage``), and applying, saving and merging adapters (``adapters``)."""
