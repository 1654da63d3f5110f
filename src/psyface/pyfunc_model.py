"""Models-from-code entry: MLflow runs this file to load the registered pyfunc, so no pickle is
stored in the model (executing a stored model's code is still trusted-only)."""

from mlflow.models import set_model

from psyface.serving import AttributePyfunc

set_model(AttributePyfunc())
