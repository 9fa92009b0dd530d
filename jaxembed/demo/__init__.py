"""The demo: a click log, a DLRM-style model, and the end-to-end job ``jaxembed demo`` runs.

* ``jaxembed.demo.data``: ``ClickLog`` (synthetic or MovieLens ml-latest-small);
* ``jaxembed.demo.model``: the features, the Flax ``Tower``, batching and AUC;
* ``jaxembed.demo.config``: ``DemoConfig`` (the CLI's options), their checks, the optional
  packages it needs (the ``demo`` extra), and which files in ``--out`` are the demo's own (a
  re-run is refused, with ``overwrite`` starts clean, with ``resume`` continues training);
* ``jaxembed.demo.run``: ``run(DemoConfig(...))``: train on every device, checkpoint, export,
  serve from a TensorFlow-only process, compare, plot (train and test loss, test AUC, epochs).
"""
