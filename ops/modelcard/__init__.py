"""The scripts behind models/shunt-sentiment/MODEL_CARD.md: cross-validation, calibration, speed ratio.
Run as ``python -m ops.modelcard.<script>``; they read ../shared/data and write only to .bench/ or stdout."""
