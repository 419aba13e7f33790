"""The tracking layer: MLflow runs, registered versions and the promotion gate (above models/,
below serving/)."""
