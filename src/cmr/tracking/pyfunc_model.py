"""Models-from-code entry of the registered pyfunc: MLflow executes this file to get the model object."""
from mlflow.models import set_model

from cmr.tracking.pyfunc import TwoTowerEncoder

set_model(TwoTowerEncoder())
