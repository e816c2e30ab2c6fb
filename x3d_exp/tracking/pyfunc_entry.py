"""The file MLflow runs to get a trained X3D's pyfunc when it loads the model (MLflow's "models from code").

A model saved this way holds this file instead of a pickled object, so loading it deserializes no pickle. MLflow
puts the model's own copy of x3d_exp (its code/ folder) on sys.path before running the file. Nothing in x3d_exp
imports this module: importing it registers the model with MLflow.
"""

from mlflow.models import set_model

from x3d_exp.tracking.models import VideoClassifier

set_model(VideoClassifier())
