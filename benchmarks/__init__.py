"""The benchmarks of monai-efficientq, as a small package beside the library (not installed with it).

One comparison run (``python benchmarks/compare.py run ...``) is put together from:

- :mod:`benchmarks.config`: :class:`~benchmarks.config.CompareConfig`, the settings of one run (the command's flags),
  and :class:`~benchmarks.config.Setting` (``W2``, ``W4A4``, ...);
- :mod:`benchmarks.methods`: the :class:`~benchmarks.methods.Method` protocol and the registry of the methods
  compared, ours (:mod:`benchmarks.ours`) and Brevitas' post-training quantizers (:mod:`benchmarks.brevitas_methods`);
- :mod:`benchmarks.data`: the network, the evaluation volumes and the calibration crop, all through
  :mod:`monai_efficientq.io` and the package's ``CalibrationCropd`` (the bundle's calibration protocol);
- :mod:`benchmarks.plan`: what every method shares about the float network (BatchNorm pairs, layer order, edges);
- :mod:`benchmarks.evaluation`: the one evaluator (sliding-window prediction, Dice per class);
- :mod:`benchmarks.measure`: time, peak memory and a fresh process per row;
- :mod:`benchmarks.runner`: the rows of a comparison and the timing-only runs;
- :mod:`benchmarks.report`: the JSON and Markdown tables.

The other scripts (``brats_speed.py``, ``segresnet_cpu.py``, ``phase_times.py``, ``published_speed.py``,
``solver_speed.py``, ``merge_results.py``, ``plot.py``) run as files and reuse these pieces.
"""
