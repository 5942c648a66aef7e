"""TumorScope stages and the library code they share.

Each stage is one module with a pure ``run(config) -> result`` function and a
``python -m components.<stage>`` entry that ``dvc.yaml`` calls.
"""
