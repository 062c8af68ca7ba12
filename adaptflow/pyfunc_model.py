"""The registered model's entry point, logged as code (MLflow "models from code").

``registry`` passes this file's path as ``python_model``: MLflow copies it next to the model's ``MLmodel`` and
runs it at load time (with the model's ``code/`` folder, the adaptflow library, on ``sys.path``), instead of
cloudpickling a ``HeadClassifier`` object. A registered model is therefore safetensors (the head) + JSON (the
spec, the examples) + code, and loading it unpickles nothing.
"""

import mlflow.models

from adaptflow.serving import HeadClassifier

mlflow.models.set_model(HeadClassifier())
