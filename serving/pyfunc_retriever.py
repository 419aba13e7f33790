"""Models-from-code file of a retrieval bundle's pyfunc (logged by
:func:`kgrec.serving.pyfunc.log_bundle_model`; MLflow runs it when it loads the model)."""

import mlflow.models
from kgrec.serving.pyfunc import TopKRecommender

mlflow.models.set_model(TopKRecommender())
